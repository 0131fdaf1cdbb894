"""Using what was trained: find a trained model by reference, load it, classify images with it."""
