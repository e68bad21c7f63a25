r"""Writes synthetic e-commerce sessions in the event-session JSONL format (see mlm_jax/data/events.py).

  python tools/make_event_sessions.py --out sessions.jsonl --sessions 10000 --seed 0

Each session is a few shopping "journeys": a search query, views of products that match it (mostly
the searched category, sometimes the brand's other products), now and then an add_to_cart of a
viewed product and a purchase of a carted one. Product titles follow a small catalog (brand, line,
category, attributes), so a model can learn e.g. which category a query leads to and that a
purchase repeats a carted title. Output depends only on (--sessions, --seed). The sample that
configs/event_bert.py trains on by default was made with it (see mlm_jax/assets/events/LICENSE.md).
"""
import argparse
import json
import random

CATEGORIES = {
    'headphones': (['wireless', 'noise cancelling', 'over-ear', 'in-ear', 'bluetooth', 'sport'],
                   ['sony', 'bose', 'jbl', 'sennheiser', 'anker']),
    'laptop': (['14 inch', '16 inch', 'gaming', 'ultralight', '16gb ram', '512gb ssd'],
               ['lenovo', 'dell', 'asus', 'apple', 'hp']),
    'running shoes': (['trail', 'cushioned', 'lightweight', 'waterproof', 'mens', 'womens'],
                      ['nike', 'adidas', 'asics', 'brooks', 'hoka']),
    'coffee maker': (['espresso', 'drip', 'programmable', 'single serve', 'stainless steel'],
                     ['delonghi', 'breville', 'philips', 'krups', 'nespresso']),
    'backpack': (['waterproof', 'travel', 'laptop', 'hiking', '30l', 'anti-theft'],
                 ['osprey', 'samsonite', 'deuter', 'herschel', 'thule']),
    'smartphone': (['128gb', '256gb', 'dual sim', '5g', 'unlocked', 'fast charging'],
                   ['samsung', 'apple', 'google', 'xiaomi', 'motorola']),
    'desk lamp': (['led', 'dimmable', 'usb charging', 'adjustable', 'warm light'],
                  ['ikea', 'philips', 'baseus', 'benq', 'lepro']),
    'yoga mat': (['non-slip', 'thick', 'eco-friendly', 'travel', '6mm'],
                 ['manduka', 'gaiam', 'liforme', 'lululemon', 'jade']),
}
COLORS = ['black', 'white', 'blue', 'red', 'grey', 'green', 'silver']
QUERY_STYLES = ('{cat}', '{attr} {cat}', '{brand} {cat}', 'best {cat}', 'cheap {attr} {cat}',
                '{cat} {color}', '{brand} {attr} {cat}')


def product(rng, cat, brand=None):
  attrs, brands = CATEGORIES[cat]
  brand = brand or rng.choice(brands)
  line = f'{brand[:2]}-{rng.randrange(100, 1000)}'
  picked = rng.sample(attrs, k=rng.randint(1, 2))
  return f'{brand} {line} {" ".join(picked)} {cat} {rng.choice(COLORS)}'


def journey(rng):
  cat = rng.choice(sorted(CATEGORIES))
  attrs, brands = CATEGORIES[cat]
  brand = rng.choice(brands)
  query = rng.choice(QUERY_STYLES).format(cat=cat, attr=rng.choice(attrs), brand=brand,
                                          color=rng.choice(COLORS))
  events = [{'type': 'search', 'text': query}]
  viewed = []
  for _ in range(rng.randint(1, 4)):
    if rng.random() < 0.15:  # a detour to another category
      title = product(rng, rng.choice(sorted(CATEGORIES)))
    else:
      title = product(rng, cat, brand if brand in query and rng.random() < 0.7 else None)
    viewed.append(title)
    events.append({'type': 'view', 'text': title})
  if rng.random() < 0.4:
    carted = rng.choice(viewed)
    events.append({'type': 'add_to_cart', 'text': carted})
    if rng.random() < 0.5:
      events.append({'type': 'purchase', 'text': carted})
  return events


def make_sessions(n: int, seed: int) -> list[dict]:
  rng = random.Random(seed)
  out = []
  for i in range(n):
    events = []
    for _ in range(1 + (rng.random() < 0.3) + (rng.random() < 0.1)):
      events += journey(rng)
    out.append({'session_id': f's{seed}-{i:07d}', 'events': events})
  return out


def write(path: str, n: int, seed: int) -> int:
  sessions = make_sessions(n, seed)
  with open(path, 'w', encoding='utf-8') as f:
    for s in sessions:
      f.write(json.dumps(s) + '\n')
  return len(sessions)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--out', required=True, help='JSONL file to write.')
  p.add_argument('--sessions', type=int, default=1000, help='Number of sessions.')
  p.add_argument('--seed', type=int, default=0, help='Random seed (same seed, same file).')
  a = p.parse_args()
  n = write(a.out, a.sessions, a.seed)
  print(f'wrote {n} sessions to {a.out}')


if __name__ == '__main__':
  main()
