"""Vocabularies: built-ins, files (txt/yaml/json, local and fsspec), hashes, prompts, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import fsspec
import pytest

from clipdiy.errors import VocabularyError
from clipdiy.segmentation.config import PromptConfig
from clipdiy.segmentation.vocabulary import (
    COCO_CLASSES,
    Vocabulary,
    builtin_vocabularies,
    VocabularyClass,
    class_prompts,
    fill_template,
    load_vocabulary,
    prompt_templates,
    vocabulary_hash,
)

# Copied from SPEC 1.5 (the reference's dataset code), spelling included.
VOC_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv/monitor",
)  # fmt: skip

VOC_READABLE_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor",
)  # fmt: skip


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_voc_builtin():
    vocabulary = load_vocabulary("voc")
    assert vocabulary.name == "voc"
    assert vocabulary.class_names == VOC_NAMES
    assert len(vocabulary) == 21
    assert all(cls.synonyms == (cls.name,) for cls in vocabulary.classes)


def test_voc_builtin_builds_the_references_prompts():
    prompts = [class_prompts(cls, PromptConfig())[0] for cls in load_vocabulary("voc").classes]
    assert prompts[11] == "a photo of a diningtable"
    assert prompts[16] == "a photo of a potted plant"
    assert prompts[20] == "a photo of a tv/monitor"


def test_voc_readable_builtin():
    vocabulary = load_vocabulary("voc-readable")
    assert vocabulary.name == "voc-readable"
    assert vocabulary.class_names == VOC_READABLE_NAMES
    assert vocabulary.content_hash != load_vocabulary("voc").content_hash
    assert {"voc", "voc-readable", "coco"} <= set(builtin_vocabularies())


def test_coco_builtin_matches_coco_categories(coco_sample):
    vocabulary = load_vocabulary("coco")
    assert len(vocabulary) == 81 and vocabulary.class_names[0] == "background"
    (instances,) = (coco_sample / "annotations").glob("*.json")
    categories = sorted(json.loads(instances.read_text())["categories"], key=lambda c: c["id"])
    assert vocabulary.class_names[1:] == tuple(c["name"] for c in categories) == COCO_CLASSES
    assert {"dining table", "tv", "hair drier"} <= set(vocabulary.class_names)  # SPEC 1.5's examples


def test_text_file_comments_blank_lines_and_background_prepended(tmp_path):
    path = write(tmp_path, "animals.txt", "# my classes\n\ncat\n  dog   # good boy\n\nhot   air balloon\n")
    vocabulary = load_vocabulary(path)
    assert vocabulary.name == "animals"
    assert vocabulary.class_names == ("background", "cat", "dog", "hot air balloon")


def test_text_file_starting_with_background_is_kept(tmp_path):
    vocabulary = load_vocabulary(write(tmp_path, "v.txt", "background\ncat\n"))
    assert vocabulary.class_names == ("background", "cat")


def test_yaml_list_with_synonyms(tmp_path):
    path = write(tmp_path, "v.yaml", "- cat\n- tv monitor: [television, monitor]\n- dog: puppy\n- sofa: null\n")
    vocabulary = load_vocabulary(path)
    assert vocabulary.class_names == ("background", "cat", "tv monitor", "dog", "sofa")
    assert vocabulary.classes[2].synonyms == ("tv monitor", "television", "monitor")
    assert vocabulary.classes[3].synonyms == ("dog", "puppy")
    assert vocabulary.classes[4].synonyms == ("sofa",)


def test_yaml_mapping_and_json_give_the_same_vocabulary(tmp_path):
    from_yaml = load_vocabulary(write(tmp_path, "a.yml", "cat: [kitten]\ndog: []\n"))
    from_json = load_vocabulary(write(tmp_path, "b.json", json.dumps([{"cat": ["kitten"]}, "dog"])))
    assert from_yaml.classes == from_json.classes
    assert from_yaml.content_hash == from_json.content_hash
    assert from_yaml.name == "a" and from_json.name == "b"


def test_fsspec_uri():
    with fsspec.open("memory://vocabularies/fruit.txt", "w") as handle:
        handle.write("apple\nbanana\n")
    vocabulary = load_vocabulary("memory://vocabularies/fruit.txt")
    assert vocabulary.name == "fruit"
    assert vocabulary.class_names == ("background", "apple", "banana")


def test_content_hash_is_canonical_and_stable(tmp_path):
    voc = load_vocabulary("voc")
    same = load_vocabulary(write(tmp_path, "voc_copy.txt", "\n".join(VOC_NAMES[1:])))
    assert same.content_hash == voc.content_hash  # the vocabulary's name is not part of it
    reordered = Vocabulary.from_names("voc", (VOC_NAMES[2], VOC_NAMES[1], *VOC_NAMES[3:]))
    assert reordered.content_hash != voc.content_hash
    with_synonym = Vocabulary.from_names("voc", (("aeroplane", "airplane"), *VOC_NAMES[2:]))
    assert with_synonym.content_hash != voc.content_hash
    assert len(voc.content_hash) == 64 and int(voc.content_hash, 16) >= 0
    # Same in a fresh interpreter (no dependence on hash seeds or dict order).
    code = "from clipdiy.segmentation.vocabulary import load_vocabulary; print(load_vocabulary('voc').content_hash)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert other.stdout.strip() == voc.content_hash
    # Pinned: a change of the canonical form invalidates every cache and output row that stores it.
    # (voc-readable holds the names voc had before it took the reference's spelling: same hash as then.)
    assert voc.content_hash == "3fd9405ef730b3822b1bab98d5ac3c67f6c478d25ad0cc07ab2689e9ed45de11"
    assert load_vocabulary("voc-readable").content_hash == "481a53de18878a630568929a6b53f37cebc0b4dc6e430bb1e046a857bc137ffa"


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("empty.txt", "", "empty"),
        ("comments.txt", "# nothing\n\n   \n", "empty"),
        ("only_background.txt", "background\n", "empty"),
        ("empty.yaml", "", "empty"),
        ("dup.txt", "cat\ndog\nCat\n", "duplicate"),
        ("dup_synonym.yaml", "- cat: [kitty]\n- dog: [Kitty]\n", "duplicate"),
        ("bg_later.txt", "cat\nbackground\n", "background"),
        ("bg_synonym.yaml", "- cat: [background]\n", "background"),
        ("bad.json", '["cat", ', "not valid JSON"),
        ("bad.yaml", "- cat: [unclosed\n", "not valid YAML"),
        ("scalar.yaml", "42\n", "must hold a list"),
        ("numbers.json", "[1, 2]", "each list item"),
        ("nested.yaml", "- [cat, dog]\n", "each list item"),
        ("bad_synonyms.yaml", "cat: {a: b}\n", "synonyms of 'cat'"),
        ("empty_synonym.yaml", "cat: ['  ']\n", "empty synonym"),
    ],
)
def test_bad_vocabularies(tmp_path, name, text, message):
    with pytest.raises(VocabularyError, match=message):
        load_vocabulary(write(tmp_path, name, text))


def test_missing_file_and_bad_builtin(tmp_path):
    with pytest.raises(VocabularyError, match="not found"):
        load_vocabulary(str(tmp_path / "nope.txt"))
    with pytest.raises(VocabularyError, match="not found"):
        load_vocabulary("VOC2012")  # neither a built-in (names are lower-case) nor a file
    with pytest.raises(VocabularyError, match="not found"):
        load_vocabulary("memory://nowhere/missing.yaml")


def test_constructed_vocabularies_are_validated():
    with pytest.raises(VocabularyError, match="class 0"):
        Vocabulary("v", (VocabularyClass("cat", ("cat",)),))
    with pytest.raises(VocabularyError, match="synonyms must start with the name"):
        VocabularyClass("cat", ("kitten", "cat"))
    with pytest.raises(VocabularyError, match="empty"):
        Vocabulary.from_names("v", [])
    with pytest.raises(VocabularyError, match="duplicate"):
        Vocabulary.from_names("v", ["cat", "CAT"])


def test_faithful_prompt_has_no_article_rule():
    voc = load_vocabulary("voc")
    assert class_prompts(voc.classes[0], PromptConfig()) == ("a photo of a background",)
    assert class_prompts(voc.classes[1], PromptConfig()) == ("a photo of a aeroplane",)
    assert class_prompts(voc.classes[1], PromptConfig(article=True)) == ("a photo of an aeroplane",)
    assert class_prompts(voc.classes[2], PromptConfig(article=True)) == ("a photo of a bicycle",)


def test_article_rule_only_touches_the_indefinite_article():
    assert fill_template("a photo of the {}.", "owl", article=True) == "a photo of the owl."
    assert fill_template("a bad photo of a {}.", "owl", article=True) == "a bad photo of an owl."
    assert fill_template("A {} in a box", "egg", article=True) == "An egg in a box"
    assert fill_template("itap of a {}.", "Umbrella", article=True) == "itap of an Umbrella."


def test_imagenet_ensemble_and_synonyms():
    templates = prompt_templates(PromptConfig(ensemble="imagenet"))
    assert len(templates) == 80 and len(set(templates)) == 80
    assert "a photo of a {}." in templates and "itap of a {}." in templates
    cls = VocabularyClass("tv monitor", ("tv monitor", "television"))
    prompts = class_prompts(cls, PromptConfig(ensemble="imagenet"))
    assert len(prompts) == 160
    assert prompts[0] == "a bad photo of a tv monitor." and prompts[80] == "a bad photo of a television."
    with pytest.raises(ValueError, match="unknown prompt ensemble"):
        prompt_templates(PromptConfig(ensemble="openimages"))
    with pytest.raises(ValueError, match="exactly once"):
        prompt_templates(PromptConfig(templates=("no placeholder",)))


def test_vocabulary_hash_follows_the_prompts():
    voc = load_vocabulary("voc")
    faithful = vocabulary_hash(voc, PromptConfig())
    assert faithful == vocabulary_hash(load_vocabulary("voc"), PromptConfig())
    assert faithful != voc.content_hash
    assert faithful != vocabulary_hash(voc, PromptConfig(article=True))  # "an aeroplane"
    assert faithful != vocabulary_hash(voc, PromptConfig(ensemble="imagenet"))
    assert faithful != vocabulary_hash(voc, PromptConfig(templates=("a photo of a {}.",)))
    # Identical prompts give identical hashes: no vowel-initial name, so the article rule is moot.
    no_vowels = Vocabulary.from_names("v", ["cat", "dog"])
    assert vocabulary_hash(no_vowels, PromptConfig()) == vocabulary_hash(no_vowels, PromptConfig(article=True))
