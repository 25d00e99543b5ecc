"""The example service. Replace it with your own and point APP_MODULE at it."""
