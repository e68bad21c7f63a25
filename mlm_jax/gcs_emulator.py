"""A local Google Cloud Storage emulator, for tests and for trying gs:// runs without a cloud account.

    python -m mlm_jax.gcs_emulator --bucket=bkt [--port=9023]

starts the `gcp-storage-emulator` package's server on 127.0.0.1 (`pip install -e '.[gcs,test]'`
brings it and gcsfs), creates the bucket, prints the environment to export in other shells and
serves until Ctrl-C. Each layer has its own switch to the emulator (see `client_env`); nothing then
leaves the machine. The server gets the object generations tensorstore needs (`_add_generations`).
"""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from mlm_jax import paths

_LOOPBACK_METADATA = '127.0.0.1:9'  # the discard port: a credentials probe fails at once, locally


def available() -> bool:
  """Whether the emulator package is installed."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec('gcp_storage_emulator') is not None


def client_env(url: str, gcloud_dir: str) -> dict[str, str]:
  """The environment that points every storage client of a run at the emulator at `url`.

  `gcloud_dir`: an empty directory, so no gcloud configuration of the user's is picked up."""
  return {
      'STORAGE_EMULATOR_HOST': url,  # gcsfs (epath's gs://) and google-cloud-storage (orbax)
      'FSSPEC_GS_TOKEN': 'anon',  # gcsfs: no credential search (it would ask the GCE metadata server)
      # gcsfs: plain JSON API; its bucket-type probe speaks gRPC, which the emulator does not.
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
      'TENSORSTORE_GCS_HTTP_URL': url,  # tensorstore: orbax's array files
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',  # tensorstore: a fixed token, no credential search
      'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,  # google-cloud-cpp: array_record's TFDS reads
      # Should any library still look for credentials, it finds none, and asks only this machine.
      'CLOUDSDK_CONFIG': gcloud_dir,
      'GOOGLE_APPLICATION_CREDENTIALS': '',
      'GCE_METADATA_HOST': _LOOPBACK_METADATA,
      'GCE_METADATA_IP': _LOOPBACK_METADATA,
      'GCE_METADATA_ROOT': _LOOPBACK_METADATA,
      'NO_GCE_CHECK': 'true',
  }


def _add_generations(objects):
  """What the emulator lacks and tensorstore relies on (orbax's OCDBT manifest is read and then
  replaced with a conditional write): the object's generation in download responses
  (x-goog-generation; without it tensorstore reads generation 0 and refuses to write on it), and
  the ifGenerationMatch / ifGenerationNotMatch preconditions (query parameter or x-goog-if-*
  header). The emulator's HTTP server handles one request at a time, so a check and the write it
  guards cannot interleave with another request."""
  from http import HTTPStatus  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel

  headers = {'ifGenerationMatch': 'x-goog-if-generation-match',
             'ifGenerationNotMatch': 'x-goog-if-generation-not-match'}

  def condition(request, name):
    value = request.query.get(name)
    return value[0] if value else request.get_header(headers[name])

  def generation(storage, bucket, name) -> str:  # '0': no such object, as GCS spells it
    try:
      return str(storage.get_file_obj(bucket, name)['generation'])
    except NotFound:
      return '0'

  def refuse(response, status):
    response.status = status
    response.json({'error': {'code': status.value, 'message': status.phrase}})

  def target(request):
    name = (request.query.get('name') or [None])[0] or (request.params or {}).get('object_id')
    if name is None and isinstance(request.data, dict):  # multipart: the name is in the body
      name = (request.data.get('meta') or {}).get('name')
    return request.params['bucket_name'], name

  def guarded(handler):
    def write(request, response, storage, *args, **kwargs):
      match = condition(request, 'ifGenerationMatch')
      if match is not None and generation(storage, *target(request)) != match:
        return refuse(response, HTTPStatus.PRECONDITION_FAILED)
      return handler(request, response, storage, *args, **kwargs)
    return write

  plain_download = objects.download

  def download(request, response, storage, *args, **kwargs):
    gen = generation(storage, *target(request))
    match, not_match = condition(request, 'ifGenerationMatch'), condition(
        request, 'ifGenerationNotMatch')
    if gen != '0' and match is not None and match != gen:
      return refuse(response, HTTPStatus.PRECONDITION_FAILED)
    if gen != '0' and not_match == gen:
      response.status = HTTPStatus.NOT_MODIFIED
      response['x-goog-generation'] = gen
      return None
    plain_download(request, response, storage, *args, **kwargs)
    if gen != '0' and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      response['x-goog-generation'] = gen
    return None

  objects.download = download  # objects.get serves alt=media through this name too
  for name in ('insert', 'xml_upload', 'delete'):
    setattr(objects, name, guarded(getattr(objects, name)))


def _serve(host: str, port: int, bucket: str):
  """The emulator's server, in memory, with `_add_generations`; runs until killed."""
  import logging  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  _add_generations(objects)
  # Imported after the patch: its route table holds the handler functions themselves.
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  server.create_server(host, port, in_memory=True, default_bucket=bucket).run()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'the GCS emulator exited with status {proc.returncode}')
    try:
      with urllib.request.urlopen(url + '/', timeout=1) as r:
        if r.status == 200:
          return
    except OSError:
      time.sleep(0.1)
  raise RuntimeError(f'the GCS emulator did not answer at {url} within {timeout_s:.0f}s')


class Emulator:
  """A running emulator process with one bucket; `env` is what clients need (see client_env)."""

  def __init__(self, bucket: str, port: int = 0, log_path: str | None = None):
    if not available():
      raise RuntimeError("the GCS emulator needs `pip install gcp-storage-emulator` "
                         "(or mlm_jax[test])")
    self.bucket, self.port = bucket, port or _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._gcloud_dir = tempfile.mkdtemp(prefix='mlm_jax_gcloud_')
    self.env = client_env(self.url, self._gcloud_dir)
    self._log = open(log_path or os.devnull, 'ab')  # pylint: disable=consider-using-with
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python_path = os.pathsep.join(filter(None, [package_root, os.environ.get('PYTHONPATH')]))
    self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, '-m', 'mlm_jax.gcs_emulator', '--serve', '--port', str(self.port),
         '--bucket', bucket],
        stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=python_path))
    try:
      _wait_ready(self.url, self.proc, timeout_s=30)
    except Exception:
      self.stop()
      raise

  def stop(self):
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self._log.close()
    shutil.rmtree(self._gcloud_dir, ignore_errors=True)


@contextlib.contextmanager
def activated(env: dict[str, str]):
  """`env` in os.environ for the duration of a `with` block, for clients in this very process.

  gcsfs instances and fsspec's configuration (FSSPEC_GS_TOKEN is read when fsspec is imported)
  outlive an environment change, so both are refreshed on the way in and out."""
  saved = {k: os.environ.get(k) for k in env}

  def refresh(plain_gcsfs: bool):
    import fsspec.config  # pylint: disable=import-outside-toplevel
    from etils.epath import backend  # pylint: disable=import-outside-toplevel
    fsspec.config.conf.clear()
    fsspec.config.set_conf_files(fsspec.config.conf_dir, fsspec.config.conf)
    fsspec.config.set_conf_env(fsspec.config.conf)
    paths.uncached_listings()
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    registry = sys.modules['fsspec.registry']._registry  # pylint: disable=protected-access
    for protocol in ('gs', 'gcs'):  # gcsfs picks its class when imported: maybe before `env`
      registry.pop(protocol, None)
      if plain_gcsfs:
        import gcsfs.core  # pylint: disable=import-outside-toplevel
        registry[protocol] = gcsfs.core.GCSFileSystem
    if 'gcsfs' in sys.modules:
      sys.modules['gcsfs'].core.GCSFileSystem.clear_instance_cache()

  os.environ.update(env)
  refresh(env.get('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT') == 'false')
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    refresh(False)


@contextlib.contextmanager
def running(bucket: str, port: int = 0, log_path: str | None = None):
  """An Emulator for the duration of a `with` block; its env is NOT applied to os.environ."""
  emulator = Emulator(bucket, port, log_path)
  try:
    yield emulator
  finally:
    emulator.stop()


def main(argv=None):
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--bucket', default='bkt')
  parser.add_argument('--port', type=int, default=9023)
  parser.add_argument('--serve', action='store_true', help=argparse.SUPPRESS)  # the server itself
  args = parser.parse_args(argv)
  if not args.serve:  # a person: the environment to export, then the server in this process
    url = f'http://127.0.0.1:{args.port}'
    print(f'GCS emulator at {url}, bucket gs://{args.bucket}. In another shell:')
    for k, v in client_env(url, tempfile.mkdtemp(prefix='mlm_jax_gcloud_')).items():
      print(f"export {k}='{v}'")
    sys.stdout.flush()
  _serve('127.0.0.1', args.port, args.bucket)


if __name__ == '__main__':
  main()
