"""Vocabularies (the classes to segment) and the text prompts built from them.

A :class:`Vocabulary` is an ordered tuple of classes; class 0 is ``background``, always, and is
embedded like any other name (SPEC 1.5). Each class has one or more synonyms (the first is its
name); the text embedding of a class is the mean over its synonyms and prompt templates.

Built-ins: ``voc`` (background + the 20 PASCAL VOC classes, spelled exactly as the reference's
dataset code has them, SPEC 1.5: "diningtable", "tv/monitor", ...; the names are part of the
prompts, so faithful mode needs them verbatim), ``voc-readable`` (the same classes in plain
English: "dining table", "tv monitor", ...) and ``coco`` (background + the 80 COCO classes, COCO's
names, in category-id order); for NACLIP (SPEC 8.9) ``naclip-voc21`` and ``naclip-coco-object``:
the readable VOC names and COCO's names, each class carrying the words the NACLIP authors' class
files query for it (``VocabularyClass.queries``; background through stuff words such as sky,
wall, tree), and ``naclip-coco-object-bed``, the latter without "bed" among background's words
(see :data:`NACLIP_COCO_QUERIES`).

Vocabulary files (a local path or any fsspec URI), chosen by extension:

- ``.txt`` (or any other extension): one class per line; blank lines and ``#`` comments skipped.
- ``.yaml`` / ``.yml`` / ``.json``, either
  - a list whose items are a name, or a one-entry mapping ``{name: [synonym, ...]}`` (a single
    string synonym is accepted too), e.g. ``["cat", {"tv monitor": ["television", "monitor"]}]``;
  - or a mapping ``{name: [synonyms] | synonym | null}`` (order kept).
  The name is always the first synonym; listing it again among its synonyms is harmless.

``background`` is prepended when the file does not start with it; appearing anywhere else is an
error, as are empty vocabularies, empty names, and names or synonyms repeated (case-insensitively).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from clipdiy.errors import VocabularyError
from clipdiy.segmentation.config import PromptConfig

BACKGROUND = "background"

#: The reference's PASCAL VOC names (SPEC 1.5), spelling included: they go into the prompts.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
    "tv/monitor",
)  # fmt: skip

#: The same classes, same order, in readable English (not the paper's prompts).
VOC_READABLE_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
    "tv monitor",
)  # fmt: skip

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

FAITHFUL_TEMPLATE = "a photo of a {}"

#: The NACLIP authors' background queries (their ``cls_voc21.txt`` line 0, SPEC 8.9).
NACLIP_BACKGROUND_QUERIES = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
    "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair",
    "floor", "hill", "rail", "fence",
)  # fmt: skip
_NACLIP_PERSON = (
    "person", "person in shirt", "person in jeans", "person in dress", "person in sweater", "person in skirt",
    "person in jacket",
)  # fmt: skip
#: Queries of the NACLIP authors' VOC21 class file where they differ from the class name.
NACLIP_VOC21_QUERIES = {
    "boat": ("ship",),
    "dining table": ("table",),
    "person": _NACLIP_PERSON,
    "potted plant": ("pottedplant",),
    "tv monitor": ("television monitor", "tv monitor", "monitor", "television", "screen"),
}
#: COCO-Object as the authors' ``cls_coco_object.txt`` has it, word for word: COCO's names;
#: background through the same stuff words as VOC21 (their "bed" included), person through its
#: synonyms and "body". "bed" is then queried twice, by background and by the class bed: the two
#: maps are identical, so wherever "bed" wins the classes tie, and ties go to the lower class
#: index (argmax), background. The class bed can never win; ``naclip-coco-object`` keeps that
#: (faithful), ``naclip-coco-object-bed`` leaves "bed" out of background so that it can.
NACLIP_COCO_QUERIES = {"person": _NACLIP_PERSON + ("body",)}
NACLIP_COCO_BACKGROUND_QUERIES = NACLIP_BACKGROUND_QUERIES
NACLIP_COCO_BED_BACKGROUND_QUERIES = tuple(q for q in NACLIP_BACKGROUND_QUERIES if q != "bed")

#: The Trident authors' background queries (TRIDENT.md 5.1): their ``cls_voc21.txt`` line 0 (the
#: same 26 words as NACLIP's) and ``cls_coco_object.txt`` line 0 (17 words, "bed" among them).
TRIDENT_VOC21_BACKGROUND_QUERIES = NACLIP_BACKGROUND_QUERIES
TRIDENT_COCO_BACKGROUND_QUERIES = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
    "building", "cloud", "floor", "hill", "rail",
)  # fmt: skip
#: Queries of the Trident authors' ``cls_voc21.txt`` where they differ from the readable names.
TRIDENT_VOC21_QUERIES = {
    "boat": ("ship",),
    "dining table": ("table",),
    "potted plant": ("pottedplant",),
    "tv monitor": ("tvmonitor",),
}

_YAML_EXTENSIONS = (".yaml", ".yml")
_JSON_EXTENSIONS = (".json",)


@dataclass(frozen=True)
class VocabularyClass:
    """One class: its ``name`` and the ``synonyms`` whose prompts are averaged (``synonyms[0] == name``)."""

    name: str
    synonyms: tuple[str, ...]
    #: For methods that query words one by one and take the best (NACLIP): the words to query,
    #: when they are not the synonyms (built-in NACLIP vocabularies). ``None``: the synonyms.
    queries: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.synonyms or self.synonyms[0] != self.name:
            raise VocabularyError(f"class {self.name!r}: synonyms must start with the name, got {self.synonyms!r}")
        if self.queries is not None and (not self.queries or not all(q.strip() for q in self.queries)):
            raise VocabularyError(f"class {self.name!r}: queries must be non-empty words, got {self.queries!r}")


@dataclass(frozen=True)
class Vocabulary:
    """An ordered set of classes; ``classes[0]`` is background. Validated on construction."""

    name: str
    classes: tuple[VocabularyClass, ...]

    def __post_init__(self) -> None:
        if not self.classes or self.classes[0].name.lower() != BACKGROUND:
            raise VocabularyError(f"vocabulary {self.name!r}: class 0 must be {BACKGROUND!r}")
        if len(self.classes) < 2:
            raise VocabularyError(f"vocabulary {self.name!r} is empty (it has no class besides background)")
        seen: dict[str, str] = {}
        for index, cls in enumerate(self.classes):
            for synonym in cls.synonyms:
                if not synonym.strip():
                    raise VocabularyError(f"vocabulary {self.name!r}: class {index} has an empty name or synonym")
                key = synonym.casefold()
                if index > 0 and key == BACKGROUND:
                    raise VocabularyError(
                        f"vocabulary {self.name!r}: {BACKGROUND!r} may only be class 0, found at class {index}"
                    )
                if key in seen:
                    raise VocabularyError(
                        f"vocabulary {self.name!r}: duplicate name {synonym!r} "
                        f"(in class {cls.name!r} and class {seen[key]!r}; names compare case-insensitively)"
                    )
                seen[key] = cls.name

    @classmethod
    def from_names(cls, name: str, class_names: Iterable[str | Sequence[str]]) -> Vocabulary:
        """Build from names (or synonym lists, name first); background is prepended if missing."""
        classes = []
        for entry in class_names:
            synonyms = (entry,) if isinstance(entry, str) else tuple(entry)
            classes.append(_make_class(synonyms[0] if synonyms else "", synonyms[1:], where=name))
        if not classes or classes[0].name.strip().lower() != BACKGROUND:
            classes.insert(0, VocabularyClass(BACKGROUND, (BACKGROUND,)))
        return cls(name=name, classes=tuple(classes))

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(cls.name for cls in self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def content_hash(self) -> str:
        """sha256 hex of the classes and synonyms in order (the vocabulary's ``name`` is not part of it).

        Query words (``VocabularyClass.queries``) are part of it when any class has them.
        """
        content: dict[str, Any] = {"classes": [list(cls.synonyms) for cls in self.classes]}
        if any(cls.queries is not None for cls in self.classes):
            content["queries"] = [None if cls.queries is None else list(cls.queries) for cls in self.classes]
        return _sha256_json(content)


_BUILTINS = {"voc": VOC_CLASSES, "voc-readable": VOC_READABLE_CLASSES, "coco": COCO_CLASSES}


def builtin_vocabularies() -> tuple[str, ...]:
    return tuple(_BUILTINS) + tuple(_NACLIP_BUILTINS) + tuple(_TRIDENT_BUILTINS)


def _with_queries(name: str, class_names: Sequence[str], background: tuple[str, ...], queries: Mapping[str, tuple[str, ...]]) -> Vocabulary:
    classes = [VocabularyClass(BACKGROUND, (BACKGROUND,), queries=background)]
    classes += [VocabularyClass(n, (n,), queries=queries.get(n, (n,))) for n in class_names]
    return Vocabulary(name=name, classes=tuple(classes))


# NACLIP's class files key their query words by the readable VOC names.
_NACLIP_BUILTINS = {
    "naclip-voc21": (VOC_READABLE_CLASSES, NACLIP_BACKGROUND_QUERIES, NACLIP_VOC21_QUERIES),
    "naclip-coco-object": (COCO_CLASSES, NACLIP_COCO_BACKGROUND_QUERIES, NACLIP_COCO_QUERIES),
    "naclip-coco-object-bed": (COCO_CLASSES, NACLIP_COCO_BED_BACKGROUND_QUERIES, NACLIP_COCO_QUERIES),
}


# Trident's class files (TRIDENT.md 5.1): COCO-Object queries COCO's names themselves, so "bed"
# is queried by background and by the class bed (as NACLIP's list does; see NACLIP_COCO_QUERIES).
_TRIDENT_BUILTINS = {
    "trident-voc21": (VOC_READABLE_CLASSES, TRIDENT_VOC21_BACKGROUND_QUERIES, TRIDENT_VOC21_QUERIES),
    "trident-coco-object": (COCO_CLASSES, TRIDENT_COCO_BACKGROUND_QUERIES, {}),
}


def load_vocabulary(spec: str) -> Vocabulary:
    """A built-in name (:func:`builtin_vocabularies`) or a local path or fsspec URI of a ``.txt`` /
    ``.yaml`` / ``.yml`` / ``.json`` file."""
    if spec in _BUILTINS:
        return Vocabulary.from_names(spec, _BUILTINS[spec])
    if spec in _NACLIP_BUILTINS:
        return _with_queries(spec, *_NACLIP_BUILTINS[spec])
    if spec in _TRIDENT_BUILTINS:
        return _with_queries(spec, *_TRIDENT_BUILTINS[spec])
    text = _read_text(spec)
    name, extension = _stem_and_extension(spec)
    if extension in _YAML_EXTENSIONS or extension in _JSON_EXTENSIONS:
        data = _parse_structured(text, spec, extension)
        entries = _entries_from_structured(data, spec)
    else:
        entries = [(line, ()) for line in _lines_of_text(text)]
    if not entries:
        raise VocabularyError(f"vocabulary file {spec} is empty (no class names in it)")
    classes = [_make_class(class_name, synonyms, where=spec) for class_name, synonyms in entries]
    if classes[0].name.lower() != BACKGROUND:
        classes.insert(0, VocabularyClass(BACKGROUND, (BACKGROUND,)))
    return Vocabulary(name=name, classes=tuple(classes))


# --- prompts -------------------------------------------------------------------------------------


def prompt_templates(prompts: PromptConfig) -> tuple[str, ...]:
    """The templates a prompt config stands for: ``prompts.templates``, or the named ensemble."""
    if prompts.ensemble is None:
        templates = tuple(prompts.templates)
    elif prompts.ensemble == "imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        # open_clip stores them as callables; formatting with "{}" gives the template back.
        templates = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
    else:
        raise ValueError(f"unknown prompt ensemble {prompts.ensemble!r} (known: None, 'imagenet')")
    if not templates or any(template.count("{}") != 1 for template in templates):
        raise ValueError(f"prompt templates must each contain '{{}}' exactly once, got {templates!r}")
    return templates


_INDEFINITE_A = re.compile(r"\b([Aa]) \{\}")


def fill_template(template: str, name: str, article: bool = False) -> str:
    """``template`` with ``name`` in it; with ``article``, "a {}" becomes "an {}" before a vowel."""
    if article and name[:1].lower() in "aeiou":
        template = _INDEFINITE_A.sub(lambda m: m.group(1) + "n {}", template)
    return template.format(name)


def class_prompts(cls: VocabularyClass, prompts: PromptConfig) -> tuple[str, ...]:
    """Every prompt of one class: synonyms x templates, synonym-major."""
    templates = prompt_templates(prompts)
    return tuple(fill_template(t, synonym, prompts.article) for synonym in cls.synonyms for t in templates)


def vocabulary_hash(vocabulary: Vocabulary, prompts: PromptConfig) -> str:
    """sha256 hex of the vocabulary's content and the exact prompts: equal hashes, equal text embeddings."""
    return _sha256_json(
        {
            "vocabulary": vocabulary.content_hash,
            "prompts": [list(class_prompts(cls, prompts)) for cls in vocabulary.classes],
        }
    )


# --- file parsing --------------------------------------------------------------------------------


def _sha256_json(value: Any) -> str:
    canonical = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _read_text(spec: str) -> str:
    import fsspec

    try:
        with fsspec.open(spec, "rt", encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError as error:
        raise VocabularyError(
            f"vocabulary file not found: {spec} (pass one of {', '.join(builtin_vocabularies())} or a .txt/.yaml/.json path or URI)"
        ) from error
    except UnicodeDecodeError as error:
        raise VocabularyError(f"vocabulary file {spec} is not UTF-8 text: {error}") from error
    except IsADirectoryError as error:
        raise VocabularyError(f"vocabulary {spec} is a directory, not a file") from error


def _stem_and_extension(spec: str) -> tuple[str, str]:
    base = spec.rstrip("/").rsplit("/", 1)[-1]
    stem, extension = os.path.splitext(base)
    return stem or base, extension.lower()


def _lines_of_text(text: str) -> list[str]:
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def _parse_structured(text: str, spec: str, extension: str) -> Any:
    if extension in _JSON_EXTENSIONS:
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise VocabularyError(f"vocabulary file {spec} is not valid JSON: {error}") from error
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise VocabularyError(f"vocabulary file {spec} is not valid YAML: {error}") from error


def _entries_from_structured(data: Any, spec: str) -> list[tuple[str, tuple[str, ...]]]:
    """[(name, extra synonyms)] from a parsed YAML/JSON vocabulary."""
    if data is None:
        return []
    if isinstance(data, Mapping):
        return [_entry(name, synonyms, spec) for name, synonyms in data.items()]
    if isinstance(data, list):
        entries = []
        for item in data:
            if isinstance(item, str):
                entries.append((item, ()))
            elif isinstance(item, Mapping) and len(item) == 1:
                ((name, synonyms),) = item.items()
                entries.append(_entry(name, synonyms, spec))
            else:
                raise VocabularyError(
                    f"vocabulary file {spec}: each list item must be a name or a one-entry mapping "
                    f"{{name: [synonyms]}}, got {item!r}"
                )
        return entries
    raise VocabularyError(
        f"vocabulary file {spec} must hold a list of classes or a mapping name -> synonyms, got {type(data).__name__}"
    )


def _entry(name: Any, synonyms: Any, spec: str) -> tuple[str, tuple[str, ...]]:
    if not isinstance(name, str):
        raise VocabularyError(f"vocabulary file {spec}: class names must be strings, got {name!r}")
    if synonyms is None:
        return name, ()
    if isinstance(synonyms, str):
        return name, (synonyms,)
    if isinstance(synonyms, list) and all(isinstance(s, str) for s in synonyms):
        return name, tuple(synonyms)
    raise VocabularyError(
        f"vocabulary file {spec}: synonyms of {name!r} must be a string or a list of strings, got {synonyms!r}"
    )


def _make_class(name: str, synonyms: Sequence[str], where: str) -> VocabularyClass:
    name = " ".join(name.split())
    if not name:
        raise VocabularyError(f"vocabulary {where}: empty class name")
    ordered = [name]
    for synonym in synonyms:
        synonym = " ".join(synonym.split())
        if not synonym:
            raise VocabularyError(f"vocabulary {where}: empty synonym of class {name!r}")
        if synonym.casefold() not in (s.casefold() for s in ordered):
            ordered.append(synonym)
    return VocabularyClass(name, tuple(ordered))
