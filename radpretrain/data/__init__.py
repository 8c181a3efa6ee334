"""Radiograph-native augmentation and small labeled cohorts."""
