"""tools/race.py: the shared scorer (fixed masks, the loss), the article split, and a short race."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO, 'tools'))

import race  # noqa: E402
import race_score  # noqa: E402


def _rows():
  lines = [list(range(10, 10 + n)) for n in (40, 3, 200, 12)]  # the 3-token line is dropped
  return race_score.rows_per_line(lines, seq=64)


def test_rows_are_cls_text_sep_cut_and_padded():
  ids_NL, attention_NL = _rows()
  assert ids_NL.shape == (3, 64)
  assert list(ids_NL[0, :3]) == [race_score.CLS, 10, 11] and ids_NL[0, 41] == race_score.SEP
  assert ids_NL[0, 42:].tolist() == [race_score.PAD] * 22 and attention_NL[0].sum() == 42
  assert ids_NL[1, -1] == race_score.SEP and attention_NL[1].all()  # cut to seq, [SEP] kept


def test_fixed_masks_are_the_same_every_time_and_15_percent_of_real_tokens():
  ids_NL, attention_NL = _rows()
  a = race_score.make_heldout(ids_NL, attention_NL, vocab_size=300, seed=0)
  b = race_score.make_heldout(ids_NL, attention_NL, vocab_size=300, seed=0)
  for x, y in zip(a.__dict__.values(), b.__dict__.values()):
    np.testing.assert_array_equal(x, y)
  counts = a.weights_NP.sum(1)
  assert counts.tolist() == [round(0.15 * 40), round(0.15 * 62), round(0.15 * 12)]
  for i in range(3):
    k = int(counts[i])
    pos = a.positions_NP[i, :k]
    assert (ids_NL[i, pos] >= race_score.N_SPECIAL).all()  # never [CLS]/[SEP]/[PAD]
    np.testing.assert_array_equal(a.labels_NP[i, :k], ids_NL[i, pos])
    untouched = np.setdiff1d(np.arange(64), pos)
    np.testing.assert_array_equal(a.input_ids_NL[i, untouched], ids_NL[i, untouched])
  c = race_score.make_heldout(ids_NL, attention_NL, vocab_size=300, seed=1)
  assert not np.array_equal(a.positions_NP, c.positions_NP)


def test_score_is_the_mean_cross_entropy_at_the_masked_tokens(tmp_path):
  ids_NL, attention_NL = _rows()
  held = race_score.make_heldout(ids_NL, attention_NL, vocab_size=300, seed=0)
  held.save(tmp_path / 'h.npz')
  held = race_score.Heldout.load(tmp_path / 'h.npz')
  # Uniform logits: the loss is log V whatever the labels.
  uniform = lambda i, a, p: np.zeros((*p.shape, 300), np.float32)
  assert race_score.score(uniform, held, batch=2) == pytest.approx(math.log(300))
  # A model that puts logit 5 on the right token: CE = log(299 + e^5) - 5, at real slots only.
  def right(i, a, p):
    out = np.zeros((*p.shape, 300), np.float32)
    s = next(s for s in range(len(held.input_ids_NL)) if np.array_equal(
        held.input_ids_NL[s:s + len(i)], i))
    np.put_along_axis(out, held.labels_NP[s:s + len(i)][..., None], 5.0, -1)
    return out
  assert race_score.score(right, held, batch=2) == pytest.approx(math.log(299 + math.exp(5)) - 5)


def test_split_articles_cuts_at_a_heading():
  lines = []
  for a in range(10):
    lines += [' \n', f' = Article {a} = \n', ' \n', f' text {a} \n', ' = = Section = = \n', ' more \n']
  train, held = race.split_articles(lines, 0.1)
  assert held[0] == ' = Article 9 = \n' and len(train) + len(held) == len(lines)
  assert all('Article 9' not in l for l in train)


@pytest.mark.slow
def test_a_short_race_of_ours_scores_checkpoints_on_the_heldout_text(tmp_path):
  """The race as run, with our BERT recipe alone on the shipped Shakespeare slice (the reference
  needs its own interpreter and shared/, which a clean clone does not have)."""
  text = os.path.join(_REPO, 'mlm_jax', 'assets', 'shakespeare')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run(
      [sys.executable, os.path.join(_REPO, 'tools', 'race.py'), '--contenders', 'bert',
       '--train_text', os.path.join(text, 'train.txt'), '--heldout_text',
       os.path.join(text, 'valid.txt'), '--vocab', '2000', '--budget_s', '75', '--calibrate_steps',
       '15', '--score_every_s', '5', '--workdir', str(tmp_path)],
      env=env, capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  results = json.load(open(tmp_path / 'results.json'))
  points = results['curves']['bert']
  assert len(points) >= 2 and all(p['t'] <= 75 for p in points)
  assert points[-1]['loss'] < points[0]['loss'] < math.log(2000) + 0.5
  assert (tmp_path / 'race.png').stat().st_size > 10_000
