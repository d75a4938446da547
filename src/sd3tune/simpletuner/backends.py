"""Typed entries of SimpleTuner's ``multidatabackend.json`` for SD3 LoRA runs on local folders.

SimpleTuner silently ignores unknown keys, treats the string "false" as true and uses numbers as JSON gives them (a
quoted ``"resolution": "64"`` fails with a TypeError once the models are loaded); these models forbid all three.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, StrictBool, Tag, TypeAdapter
from pydantic_core import PydanticCustomError

NUMBER_ERROR = "number_type"  # the error type of a string (or boolean) where a number belongs


def _json_number(value: Any) -> Any:
    """Only JSON numbers: no string that looks like one, no boolean (pydantic would convert both)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = {bool: "a boolean", str: "a string", type(None): "null", list: "a list", dict: "an object"}
        raise PydanticCustomError(NUMBER_ERROR, "Input should be a number, not {kind}",
                                  {"kind": kind.get(type(value), type(value).__name__)})
    return value


# Numbers only; past that check the usual rules: an int field takes 1.0 (SimpleTuner int()s repeats) but not 1.5,
# a float field takes an int (as SimpleTuner does).
Int = Annotated[int, BeforeValidator(_json_number)]
Float = Annotated[float, BeforeValidator(_json_number)]
Number = Annotated[int | float, BeforeValidator(_json_number)]


class _Backend(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, description="Unique name of this dataset.")
    type: Literal["local"] = Field("local", description="Storage backend; sd3tune supports local folders.")
    disabled: StrictBool = Field(False, description="Skip this dataset.")


# Image dataset settings the run's config sets (RESOLUTION, RESOLUTION_TYPE, MINIMUM_RESOLUTION) where an entry does
# not set its own
RUN_DEFAULTED = ("resolution", "resolution_type", "minimum_image_size")


class ImageBackend(_Backend):
    dataset_type: Literal["image"] = Field("image", description="Training images.")
    instance_data_dir: str = Field(..., min_length=1, description="Folder of training images.")
    caption_strategy: Literal["textfile", "filename", "instanceprompt"] = Field(
        "textfile", description="Where captions come from: a .txt beside each image, the file name, or one prompt.")
    instance_prompt: str | None = Field(None, description="Caption for every image (caption_strategy=instanceprompt), "
                                                          "or the prefix of every caption (prepend_instance_prompt).")
    prepend_instance_prompt: StrictBool = Field(
        False, description="Put instance_prompt and a space before every caption (textfile and filename captions).")
    resolution: Number = Field(1024, gt=0, description="Training resolution for this dataset.")
    resolution_type: Literal["pixel", "area", "pixel_area"] = Field("pixel_area", description="Unit of resolution.")
    minimum_image_size: Number | None = Field(None, ge=0, description="Skip images smaller than this.")
    maximum_image_size: Number | None = Field(None, gt=0, description="Downsample images larger than this.")
    target_downsample_size: Number | None = Field(None, gt=0, description="Size large images are reduced to.")
    crop: StrictBool = Field(False, description="Crop images to the bucket instead of resizing.")
    crop_aspect: Literal["square", "preserve", "random", "closest"] = Field("square", description="Crop shape.")
    crop_aspect_buckets: list[Float] | None = Field(
        None, description="Aspect ratios to crop to (needed by crop_aspect random and closest).")
    crop_style: Literal["random", "center", "centre", "corner", "face"] = Field("random", description="Crop position.")
    repeats: Int = Field(0, ge=0, description="Extra passes over this dataset per epoch.")
    probability: Float = Field(1.0, gt=0, le=1, description="Chance this dataset is sampled for a batch.")
    cache_dir_vae: str = Field(..., min_length=1, description="Where VAE latents are cached.")
    metadata_backend: Literal["discovery", "json", "parquet"] = Field("discovery",
                                                                      description="How image metadata is read.")
    skip_file_discovery: str | None = Field(None, description="Space-separated phases to skip (vae aspect text).")
    is_regularisation_data: StrictBool = Field(False, description="Regularisation images (prior preservation).")
    vae_cache_clear_each_epoch: StrictBool = Field(False, description="Re-encode latents every epoch.")
    text_embeds: str | None = Field(None, description="id of the text-embeds dataset to use (default one if empty).")
    cache_file_suffix: str | None = Field(
        None, min_length=1, description="Suffix of the aspect-bucket files SimpleTuner writes into the image folder "
                                        "(aspect_ratio_bucket_indices_SUFFIX.json; default: the id). sd3tune makes it "
                                        "unique per run: SimpleTuner fills settings missing from a dataset entry, or "
                                        "put back ones that differ, from that file, so runs sharing a folder mixed "
                                        "their crop and resolution.")

    def effective(self, data: Any) -> ImageBackend:
        """This dataset as SimpleTuner trains it, given the run config's ``data`` section: the settings in
        RUN_DEFAULTED come from there unless the entry sets its own (factory.py), not from this model's defaults."""
        return self.model_copy(update={k: getattr(data, k) for k in RUN_DEFAULTED if k not in self.model_fields_set})


class TextEmbedsBackend(_Backend):
    dataset_type: Literal["text_embeds"] = Field(..., description="Cache of prompt embeddings.")
    default: StrictBool = Field(True, description="The text-embeds cache used by image datasets.")
    cache_dir: str = Field(..., min_length=1, description="Where text embeddings are cached.")
    write_batch_size: Int | None = Field(None, ge=1, description="Embeddings written per batch.")


def _kind(value) -> str:
    if isinstance(value, dict):
        return "text_embeds" if value.get("dataset_type") == "text_embeds" else "image"
    return "text_embeds" if getattr(value, "dataset_type", "image") == "text_embeds" else "image"


Backend = Annotated[Union[Annotated[ImageBackend, Tag("image")], Annotated[TextEmbedsBackend, Tag("text_embeds")]],
                    Discriminator(_kind)]
BACKENDS = TypeAdapter(list[Backend])


def dump_backends(backends: list[ImageBackend | TextEmbedsBackend]) -> list[dict]:
    """JSON-ready dicts with the fields a user set or that SimpleTuner needs (no noise from defaults)."""
    out = []
    for b in backends:
        keep = {"id", "type", "dataset_type", "instance_data_dir", "caption_strategy", "cache_dir_vae", "cache_dir",
                "default", "resolution", "resolution_type"}
        data = b.model_dump(mode="json")
        out.append({k: v for k, v in data.items() if k in keep or k in b.model_fields_set})
    return out
