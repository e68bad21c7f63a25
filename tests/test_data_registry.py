"""The registry names every data source and tokenizer, and no mlm_jax module imports itself back."""
import ast
import os

import pytest

from mlm_jax.config import base_config
from mlm_jax.data import config as data_config
from mlm_jax.data import domains, events, registry, sources, tfds_source, tokenizers

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'mlm_jax')


def _modules(root):
  """{'mlm_jax.x.y': path} of every .py file under root (a package's __init__ is the package)."""
  out = {}
  base = os.path.dirname(root)
  for folder, _, files in os.walk(root):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, base)[:-3].replace(os.sep, '.')
        out[name[:-len('.__init__')] if name.endswith('.__init__') else name] = path
  return out


def _target(name, modules):
  """The module a dotted import name refers to: the longest prefix that is a module."""
  while name and name not in modules:
    name = name.rpartition('.')[0]
  return name or None


def import_graph(modules):
  """module -> the mlm_jax modules it imports anywhere in its body (functions included).

  `from pkg import mod` is an edge to pkg.mod when that is a module, else to pkg; `import a.b` is
  an edge to a.b. The implicit import of a module's parent packages is not an edge: every module
  of a package would otherwise 'import' the package's __init__ and with it whatever that re-exports.
  """
  graph = {}
  for name, path in modules.items():
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), path)
    package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
    edges = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [_target(a.name, modules) for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          parts = package.split('.')
          parts = parts[:len(parts) - node.level + 1]
          base = '.'.join(parts + ([node.module] if node.module else []))
        targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else _target(base, modules)
                   for a in node.names]
      else:
        continue
      edges.update(t for t in targets if t and t != name)
    graph[name] = edges
  return graph


def cycles(graph):
  """Strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_cycle_finder_finds_cycles_through_function_level_imports(tmp_path):
  pkg = tmp_path / 'pkg'
  (pkg / 'sub').mkdir(parents=True)
  (pkg / '__init__.py').write_text('from pkg.sub import a\n')
  (pkg / 'sub' / '__init__.py').write_text('')
  (pkg / 'sub' / 'a.py').write_text('from . import b\n')
  (pkg / 'sub' / 'b.py').write_text('def f():\n  from pkg.sub import c\n')
  (pkg / 'sub' / 'c.py').write_text('import pkg.sub.a\nfrom ..sub import d\n')
  (pkg / 'sub' / 'd.py').write_text('from pkg import sub\n')
  graph = import_graph(_modules(str(pkg)))
  assert graph['pkg.sub.a'] == {'pkg.sub.b'} and graph['pkg.sub.b'] == {'pkg.sub.c'}
  assert graph['pkg.sub.c'] == {'pkg.sub.a', 'pkg.sub.d'} and graph['pkg.sub.d'] == {'pkg.sub'}
  assert cycles(graph) == [['pkg.sub.a', 'pkg.sub.b', 'pkg.sub.c']]


def test_no_mlm_jax_module_imports_itself_back():
  modules = _modules(PACKAGE)
  assert {'mlm_jax.train', 'mlm_jax.data.registry', 'mlm_jax.data.sources'} <= set(modules)
  graph = import_graph(modules)
  # The data modules sit below the registry: none of them reaches it.
  for name in ('sources', 'domains', 'events', 'tokenizers', 'tfds_source', 'chunks'):
    assert 'mlm_jax.data.registry' not in graph[f'mlm_jax.data.{name}'], name
  assert cycles(graph) == []


def test_registry_covers_every_configurable_name():
  assert set(registry.SOURCES) == set(data_config.SOURCES)
  assert set(registry.TOKENIZERS) == set(data_config.TOKENIZERS)
  assert registry.SOURCES['tfds'] is tfds_source.open_source
  assert registry.SOURCES['jsonl'] is sources.open_jsonl


def _config(source, tmp_path):
  c = base_config()
  c.data.cache_dir = str(tmp_path / 'cache')
  if source == 'domains':
    c.data.update(source='domains', tokenizer='char', alphabet=data_config.DOMAIN_ALPHABET,
                  train_files='{assets}/domains/psl_private_domains.txt', eval_files='',
                  tld_vocab_size=16)
    c.model.extra_embeddings = {'tld': 16}
  elif source == 'events':
    c.data.update(source='events', tokenizer='session', vocab_path='{assets}/events/vocab.txt',
                  text_field='events', train_files=str(tmp_path / 's.jsonl'), eval_files='')
    c.model.extra_embeddings = {'event_type': 5}
    (tmp_path / 's.jsonl').write_text(
        '{"events": [{"type": "search", "text": "red shoes"}]}\n' * 3)
  elif source == 'char':
    c.data.tokenizer = 'char'
  return c


@pytest.mark.parametrize('source, cls, kind', [
    ('text', tokenizers.WordPieceTokenizer, 'wordpiece'),
    ('char', tokenizers.CharTokenizer, 'char'),
    ('domains', domains.DomainTokenizer, 'domain'),
    ('events', events.SessionTokenizer, 'session')])
def test_every_tokenizer_builds_saves_and_loads_through_the_registry(source, cls, kind, tmp_path):
  c = _config(source, tmp_path)
  calls = []

  def train_split():
    calls.append(1)
    from mlm_jax.data import pipeline
    return pipeline.split_records(c, 'train')

  c.model.vocab_size = 1  # a wrong size is refused, naming the field
  with pytest.raises(Exception, match='model.vocab_size'):
    registry.build_tokenizer(c, train_split)
  calls.clear()
  probe = registry.SOURCE_TOKENIZERS.get(c.data.source) or registry.TOKENIZERS[c.data.tokenizer]
  c.model.vocab_size = probe(c, train_split).vocab_size
  calls.clear()
  tok = registry.build_tokenizer(c, train_split)
  assert type(tok) is cls and tok.kind == kind and kind in registry.TOKENIZER_KINDS
  assert len(calls) == (1 if source == 'domains' else 0)  # only the TLD count reads the data
  tok.save(str(tmp_path / 'tok'))
  back = registry.load_tokenizer(str(tmp_path / 'tok'))
  assert type(back) is cls and back.fingerprint() == tok.fingerprint()


@pytest.mark.parametrize('source, cls', [('text', sources.TextSource),
                                         ('domains', domains.DomainSource),
                                         ('events', events.EventSource)])
def test_open_source_returns_the_registered_class_and_none_without_files(source, cls, tmp_path):
  c = _config(source, tmp_path)
  assert type(registry.open_source(c, 'train')) is cls
  c.data.eval_files = ''
  assert registry.open_source(c, 'eval') is None
