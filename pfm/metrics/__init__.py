"""Download-free quality metrics of generated videos: Moving Digits readings and the sliced
Wasserstein distance of Laplacian-pyramid patches."""
