"""The errors a user's input causes: each names the file or field, and none can change on retry."""

from backdoor import AttackError, DataError, ModelError, RecipeError, RecordError
from backdoor.backdoorbench import BackdoorBenchError
from backdoor.tensorfile import TensorFileError
from sau_kernel import SAUConfigError

from .results import ResultsError
from .spec import SpecError
from .storage import StorageError

USER_ERRORS = (AttackError, BackdoorBenchError, DataError, ModelError, RecipeError, RecordError, ResultsError,
               SAUConfigError, SpecError, StorageError, TensorFileError)
