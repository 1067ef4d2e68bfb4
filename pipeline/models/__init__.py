"""The specialist networks (2D and 3D U-Net) and sliding-window inference."""
