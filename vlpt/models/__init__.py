from vlpt.models.captioner import CaptionDecoder, Captioner, load_captioner
from vlpt.models.decoding import DecodingConfig
from vlpt.models.dual_encoder import DualEncoder
from vlpt.models.fusion import FUSION_METHODS, FusionConfig, create_fusion
from vlpt.models.heads import ClassifierHead, MatchingHead, VQAHead
from vlpt.models.image_towers import ImageTower, list_image_towers
from vlpt.models.text_towers import TextTower

__all__ = ["FUSION_METHODS", "CaptionDecoder", "Captioner", "ClassifierHead", "DecodingConfig", "DualEncoder",
           "FusionConfig", "ImageTower", "MatchingHead", "TextTower", "VQAHead", "create_fusion", "list_image_towers",
           "load_captioner"]
