"""Property-based tests of the layer-spec grammar on the real SD1.5 and SDXL layouts."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attention_guidance.guidance_core.layer_spec import LayerSpecError
from test_layer_spec import _layout

LAYOUTS = {"sd15": _layout("sd15"), "sdxl": _layout("sdxl")}
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

spec_alphabet = st.sampled_from(list("dmu0123456789.-, _") + ["mid", "down", "up", "blocks", "attentions", "attn1"])
any_text = st.lists(spec_alphabet, max_size=12).map("".join) | st.text(max_size=20)


@pytest.mark.parametrize("which", LAYOUTS)
@SETTINGS
@given(spec=any_text)
def test_any_text_selects_sites_in_forward_order_or_says_why(which, spec):
    layout = LAYOUTS[which]
    try:
        picked = layout.select(spec)
    except LayerSpecError as error:
        assert "m0 = mid_block.attentions.0" in str(error)  # every refusal lists the model's layers
        return
    assert picked
    order = [layout.sites.index(s) for s in picked]
    assert order == sorted(set(order))


@pytest.mark.parametrize("which", LAYOUTS)
def test_every_site_round_trips_through_each_spelling(which):
    layout = LAYOUTS[which]
    for site in layout.sites:
        block, block_id, k = site.host_key
        assert layout.select(site.index_name) == [site]
        assert layout.select(site.diffusers_name) == [site]
        assert layout.select(f"{block}.{block_id}.{k}") == [site]


@pytest.mark.parametrize("which", LAYOUTS)
@SETTINGS
@given(data=st.data())
def test_a_list_selects_the_union_of_its_entries(which, data):
    layout = LAYOUTS[which]
    names = [s.index_name for s in layout.sites] + [s.module_path for s in layout.sites] + ["mid", "down", "up"]
    entries = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=5))
    union = set()
    for entry in entries:
        union.update(layout.select(entry))
    assert layout.select(", ".join(entries)) == [s for s in layout.sites if s in union]


@pytest.mark.parametrize("which", LAYOUTS)
@SETTINGS
@given(data=st.data())
def test_ranges_equal_the_union_of_single_indices(which, data):
    layout = LAYOUTS[which]
    letter = data.draw(st.sampled_from("du"))
    count = len({s.module_index for s in layout.sites if s.index_name[0] == letter})
    first = data.draw(st.integers(0, count - 1))
    last = data.draw(st.integers(first, count - 1))
    singles = ",".join(f"{letter}{i}" for i in range(first, last + 1))
    assert layout.select(f"{letter}{first}-{last}") == layout.select(singles)
    assert layout.select(f"{letter}{first}-{letter}{last}") == layout.select(singles)
