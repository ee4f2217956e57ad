"""CAM family: gradcam, gradcam++, fullgrad (to be written)."""
