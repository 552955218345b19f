"""FreeFuse in the generation parameters (infotext): written as one scalar per "FreeFuse ..." key, JSON for the
subject bindings, defaults left out; read back for "paste parameters" and the API's `infotext` field."""

from __future__ import annotations

import json
from collections.abc import Mapping

from . import __version__
from .args import FreeFuseArgs
from .script_values import SETTING_KEYS

SUBJECTS_KEY = "FreeFuse subjects"  # present exactly when FreeFuse was on
VERSION_KEY = "FreeFuse version"
COVERAGE_KEY = "FreeFuse coverage"  # percent of each image each subject's mask covers (written after sampling)
WARNINGS_KEY = "FreeFuse warnings"


def setting_key(name: str) -> str:
    """The infotext key of a setting: "capture_step" -> "FreeFuse capture step"."""
    return f"FreeFuse {name.replace('_', ' ')}"


def infotext_params(args: FreeFuseArgs) -> dict[str, object]:
    """The infotext entries of an enabled run: bindings, every non-default setting, the version."""
    changed = args.to_dict(only_changed=True)
    params: dict[str, object] = {
        SUBJECTS_KEY: json.dumps([s.to_dict(only_changed=True) for s in args.subjects], ensure_ascii=False)
    }
    params.update((setting_key(key), changed[key]) for key in SETTING_KEYS if key in changed)
    params[VERSION_KEY] = __version__
    return params


def args_from_params(params: Mapping[str, object]) -> FreeFuseArgs | None:
    """The arguments an infotext records (None when FreeFuse was off); ValueError names what is wrong."""
    if SUBJECTS_KEY not in params:
        return None
    subjects = params[SUBJECTS_KEY]
    try:
        subjects = json.loads(subjects) if isinstance(subjects, str) else subjects
    except json.JSONDecodeError as error:
        raise ValueError(f"subjects: {SUBJECTS_KEY} is not valid JSON ({error.msg})") from error
    values: dict[str, object] = {"enabled": True, "subjects": subjects}
    values.update((key, params[setting_key(key)]) for key in SETTING_KEYS if setting_key(key) in params)
    return FreeFuseArgs.from_dict(values)
