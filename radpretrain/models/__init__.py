"""Encoders, 2D->3D inflation and U-Net decoders."""
