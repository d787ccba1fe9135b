"""Students: the light query encoders that map an image to a sentence in the teacher's word space.

``create_student(name, ...)`` builds any registered student; ``list_students()`` names them.
"""

from .asymmetric import MAPPERS, AsymmetricStudent, build_asymmetric_student
from .backbones import BACKBONES, DEFAULT_BACKBONE, TimmBackbone
from .mlp_mapper import MLPMapper
from .output import StudentOutput
from .registry import SYMMETRIC, create_student, list_students, register_student
from .symmetric import SymmetricStudent
from .token_learner import AdaptiveTokenLearner, sincos_pos_embed_2d

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "MAPPERS",
    "SYMMETRIC",
    "AdaptiveTokenLearner",
    "AsymmetricStudent",
    "MLPMapper",
    "StudentOutput",
    "SymmetricStudent",
    "TimmBackbone",
    "build_asymmetric_student",
    "create_student",
    "list_students",
    "register_student",
    "sincos_pos_embed_2d",
]
