"""csearch: image similarity search for domain-specific catalogues.

Implements the two-stage system of Waqas et al., "Multimodal Fused Deep Learning Networks for
Domain Specific Image Similarity Search" (CMC 2023): offline indexing (category, feature vector,
object mask per catalogue image) and online query (localize, classify, restricted exact KNN,
mask-IoU re-ranking).
"""

__version__ = "0.2.0"
