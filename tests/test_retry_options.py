"""Ray Data's retry options: passed the one way Ray 2.60 takes them, and only them; any other Ray
deprecation raised from clipdiy fails the suite (pyproject.toml's filterwarnings)."""

from __future__ import annotations

import inspect
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.util.annotations import RayDeprecationWarning

from clipdiy.pipeline.stages.retry_options import RETRY_OPTIONS, map_batches_retried


class _Dataset:
    """Warns as Ray 2.60's map_batches does for ``**ray_remote_args`` (caller's module named)."""

    def __init__(self):
        self.calls = []

    def map_batches(self, fn, **kwargs):
        import ray.data

        named = set(inspect.signature(ray.data.Dataset.map_batches).parameters)
        if set(kwargs) - named:
            warnings.warn("`ray_remote_args` is deprecated and will be removed in Ray 2.64. "
                          "Use the named remote parameters instead.", RayDeprecationWarning, stacklevel=2)
        self.calls.append(kwargs)
        return self


@settings(max_examples=30)
@given(st.dictionaries(st.sampled_from(sorted(RETRY_OPTIONS)), st.integers(-1, 100), min_size=1))
def test_retry_options_reach_map_batches_without_a_warning(retries):
    dataset = _Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        map_batches_retried(dataset, len, retries=retries, batch_size=4, num_cpus=0)
    assert dataset.calls == [{"batch_size": 4, "num_cpus": 0, **retries}]


@pytest.mark.parametrize("retries,named", [({"max_retries": 1, "scheduling_strategy": "SPREAD"}, {}),
                                           ({"max_retries": 1}, {"scheduling_strategy": "SPREAD"}),
                                           ({}, {"placement_group": None})])
def test_anything_else_passed_the_deprecated_way_is_refused(retries, named):
    dataset = _Dataset()
    with pytest.raises(TypeError):
        map_batches_retried(dataset, len, retries=retries, **named)
    assert dataset.calls == []


def test_a_ray_deprecation_from_clipdiy_fails_the_suite():
    """The filterwarnings entry of pyproject.toml is in force: a RayDeprecationWarning that Ray
    attributes to one of our modules is an error; one from elsewhere is not."""
    with pytest.raises(RayDeprecationWarning):
        warnings.warn_explicit("`ray_remote_args` is deprecated", RayDeprecationWarning, "dataset.py", 1,
                               module="clipdiy.pipeline.stages.dataset")
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("deprecated elsewhere", RayDeprecationWarning, "other.py", 1, module="other.module")
    assert [str(w.message) for w in caught] == ["deprecated elsewhere"]
