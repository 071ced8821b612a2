from .davit import DaViT

__all__ = ['DaViT']
