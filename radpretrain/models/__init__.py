"""Encoders, 2D->3D inflation and U-Net decoders; importing it registers the CBR encoders with timm."""

from radpretrain.models import cbr as cbr  # the model card's "plain timm, after `import radpretrain.models`"
