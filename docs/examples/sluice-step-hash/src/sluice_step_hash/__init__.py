"""An example Sluice step type: ``hash`` computes a digest (or an HMAC) of a text.

Install it next to Sluice (``uv pip install ./docs/examples/sluice-step-hash``) in the API's and
the workers' environments, restart them, and workflows can use::

    {"id": "sign", "type": "hash",
     "config": {"text": "{{ steps.fetch.body | tojson }}", "algorithm": "sha256", "key": "{{ secrets.SIGNING_KEY }}"}}

The output is ``{"algorithm": ..., "hex": ...}``.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from sluice_common.steps import StepCall, StepError, StepPlugin


class HashConfig(BaseModel):
    # Like the built-in step configs: camelCase, unknown fields are errors.
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)

    text: Annotated[str, Field(max_length=1_000_000)]
    algorithm: Literal["sha256", "sha512", "blake2b"] = "sha256"
    key: str | None = None  # given: an HMAC with this key


def run(config: HashConfig, call: StepCall) -> dict[str, str]:
    data = config.text.encode()
    if config.key is not None:
        if not config.key:
            raise StepError("key is empty", final=True)
        digest = hmac.new(config.key.encode(), data, config.algorithm).hexdigest()
    else:
        digest = hashlib.new(config.algorithm, data).hexdigest()
    return {"algorithm": config.algorithm, "hex": digest}


PLUGIN = StepPlugin(config_model=HashConfig, run=run, description="hash or HMAC of a text")
