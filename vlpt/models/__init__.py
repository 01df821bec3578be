from vlpt.models.dual_encoder import DualEncoder
from vlpt.models.image_towers import ImageTower, list_image_towers
from vlpt.models.text_towers import TextTower

__all__ = ["DualEncoder", "ImageTower", "TextTower", "list_image_towers"]
