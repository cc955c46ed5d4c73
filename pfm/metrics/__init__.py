"""Download-free quality metrics of generated videos: Moving Digits readings, the sliced
Wasserstein distance of Laplacian-pyramid patches and the patch-grid seam ratio."""
