"""Tests of radpretrain.pretrain (a package, so test basenames like test_config.py may repeat across folders)."""
