"""ahbf: a fast training engine for online knowledge distillation with Adaptive Hierarchy-Branch Fusion."""
__version__ = "0.1.0"
