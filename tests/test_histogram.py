"""distill/demo/quality.py `histogram_distances` on hand-built reads, against values worked out by hand from its
definition (docstring and the module's "histogram distance"): per attribute, the total-variation distance
0.5 * sum_k |p(k) - q(k)| between the normalised histograms of a prompt's reads and of the reference's reads of
the same prompt, then the plain mean over prompts (not over images)."""

from __future__ import annotations

import pytest

from distill.demo.quality import histogram_distances

P, Q = "a red circle at the top left", "a blue square"
PROMPTS = [P, Q, P, P, Q, P]  # interleaved: images are grouped by their prompt, wherever they stand


def read(shape: str, colour: str, position: str) -> dict:
    return {"shape": shape, "colour": colour, "background": "white", "position": position, "size": None}


def test_total_variation_per_prompt_then_the_mean_over_prompts():
    """Prompt P (4 images) and Q (2 images), attribute by attribute:
    shape: P reads circle x2, square x2 against circle x4: 0.5 (|2/4 - 4/4| + |2/4 - 0|) = 0.5; Q the same: 0;
    mean 0.25 (a mean over the 6 images would say 4/6 * 0.5 = 1/3; without the 0.5, 1.0 and 0.5).
    colour: P reads red, blue, red, blue against blue, red, blue, red: one histogram, 0 (a distribution, not
    pairs); Q reads blue x2 against green x2: 0.5 (1 + 1) = 1; mean 0.5.
    position: P reads top left x3, center x1 against x2, x2: 0.5 (1/4 + 1/4) = 0.25; Q 0; mean 0.125.
    background, size (None everywhere, read as the same value): 0."""
    p_run = [read("circle", "red", "top left"), read("circle", "blue", "top left"),
             read("square", "red", "top left"), read("square", "blue", "center")]
    p_ref = [read("circle", "blue", "top left"), read("circle", "red", "top left"),
             read("circle", "blue", "center"), read("circle", "red", "center")]
    q_run = [read("square", "blue", "center"), read("square", "blue", "center")]
    q_ref = [read("square", "green", "center"), read("square", "green", "center")]

    def interleave(p_reads, q_reads):
        p_iter, q_iter = iter(p_reads), iter(q_reads)
        return [next(p_iter) if prompt == P else next(q_iter) for prompt in PROMPTS]

    got = histogram_distances(interleave(p_run, q_run), interleave(p_ref, q_ref), PROMPTS)
    want = {"shape": 0.25, "colour": 0.5, "background": 0.0, "position": 0.125, "size": 0.0}
    assert got == pytest.approx(want, abs=1e-12) and set(got) == set(want)
    # symmetric, and zero against itself
    assert histogram_distances(interleave(p_ref, q_ref), interleave(p_run, q_run), PROMPTS) == pytest.approx(want)
    assert set(histogram_distances(interleave(p_run, q_run), interleave(p_run, q_run), PROMPTS).values()) == {0.0}


def test_disjoint_histograms_are_at_distance_one():
    """No read value in common: total variation 1 for every prompt, whatever the counts."""
    run = [read("ring", "yellow", "top"), read("ring", "yellow", "top"), read("ring", "purple", "top")]
    ref = [read("diamond", "gray", "bottom")] * 3
    got = histogram_distances(run, ref, [P, P, Q])
    assert (got["shape"], got["colour"], got["position"], got["background"]) == (1.0, 1.0, 1.0, 0.0)
