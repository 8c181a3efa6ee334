"""Transfer encoders into small-cohort segmentation and classification."""
