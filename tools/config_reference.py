"""Prints the config reference (every field, default, comment) as Markdown, from the schema's source.

  python tools/config_reference.py                    # print it
  python tools/config_reference.py --update README.md  # rewrite the README's "Config reference"
"""
import ast
import inspect
import sys

from mlm_jax import config as config_lib
from mlm_jax.data import config as data_config

_SECTIONS = {'c': '', 'm': 'model.', 'o': 'optimizer.', 't': 'train.', 's': 'sharding.',
             'k': 'checkpoint.', 'd': 'data.'}


def fields(module, function):
  """(dotted name, comment) for each `x.field = ...` assignment, in source order."""
  source = inspect.getsource(getattr(module, function))
  lines = source.splitlines()
  out = []
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Assign):
      continue
    for target in node.targets:
      if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
        prefix = _SECTIONS.get(target.value.id)
        # `c.model = m = ConfigDict()` opens a section; `c.data = data_config.defaults()` too.
        if prefix is None or len(node.targets) > 1 or isinstance(node.value, ast.Call) and getattr(
            node.value.func, 'attr', '') == 'defaults':
          continue
        comment, i = [], node.lineno - 2
        while i >= 0 and lines[i].strip().startswith('#'):
          comment.insert(0, lines[i].strip().lstrip('#').strip())
          i -= 1
        out.append((node.lineno, prefix + target.attr, ' '.join(comment)))
  return [(name, comment) for _, name, comment in sorted(out)]


def reference() -> str:
  base = config_lib.base_config()
  rows = fields(config_lib, 'base_config') + [
      ('data.' + n.split('.', 1)[1], c) for n, c in fields(data_config, 'defaults')]
  out = ['| field | default | meaning |', '|---|---|---|']
  for name, comment in rows:
    value = config_lib.get(base, name)
    if hasattr(value, 'to_dict'):
      value = value.to_dict()
    out.append(f'| `{name}` | `{value!r}` | {comment} |')
  return '\n'.join(out)


START, END = '<!-- config-reference:start -->\n', '<!-- config-reference:end -->'


def update_readme(path: str) -> None:
  with open(path) as f:
    text = f.read()
  text = text[:text.index(START) + len(START)] + reference() + '\n' + text[text.index(END):]
  with open(path, 'w') as f:
    f.write(text)


if __name__ == '__main__':
  if sys.argv[1:2] == ['--update']:  # python tools/config_reference.py --update README.md
    update_readme(sys.argv[2])
  else:
    sys.stdout.write(reference() + '\n')
