"""The substrate of the SAU experiments: data sets, attacks, architectures, training, metrics, records."""

from .attacks import (ATTACKS, LF, SIG, SSBA, Attack, AttackError, BadNets, BadNetsParams, Blended, BlendedParams,
                      InputAware, InputAwareParams, LFParams, SIGParams, SSBAParams, Trojan, TrojanParams, WaNet,
                      WaNetParams, make_attack)
from .data import DATASETS, DataError, ImageData, check_clean_subset, clean_subset, load_dataset, to_unit
from .metrics import EvalSets, Metrics, der, eval_sets, evaluate
from .models import ARCHS, ModelError, Normalize, build_model, check_fits
from .record import ModelRecord, RecordError, load_record, save_record
from .train import RecipeError, TrainRecipe, train_backdoored, train_clean, train_record

# Part of every backdoored model's content hash: bump it when a change here alters trained models.
CODE_VERSION = "2"

__all__ = [
    "ARCHS", "ATTACKS", "Attack", "AttackError", "BadNets", "BadNetsParams", "Blended", "BlendedParams",
    "CODE_VERSION", "DATASETS", "DataError", "EvalSets", "ImageData", "InputAware", "InputAwareParams", "LF", "LFParams", "Metrics", "ModelError",
    "ModelRecord", "Normalize", "RecipeError", "RecordError", "SIG", "SIGParams", "SSBA", "SSBAParams", "TrainRecipe", "Trojan",
    "TrojanParams", "WaNet", "WaNetParams",
    "build_model", "check_clean_subset", "check_fits", "clean_subset", "der",
    "eval_sets", "evaluate", "load_dataset", "load_record", "make_attack", "save_record", "to_unit",
    "train_backdoored", "train_clean", "train_record",
]
