"""``markov-rsa serve``: an OpenAI-compatible proxy that answers chat completions with Markovian RSA.

Put it in front of any OpenAI-compatible inference server (vLLM first) and point OpenAI clients at
it. Chat requests get Markovian RSA unless they carry tools, ask for ``n > 1`` or say
``"rsa": false``; those, and ``/v1/completions``, pass through unchanged. The request key ``rsa``
(``true``, ``false`` or an object of :class:`~markov_rsa.RSAParams` fields) follows Zyphra's RSA
proxy, so its clients switch without a change. README.md describes serving and deployment.
"""

from ._app import create_app, run_server
from ._config import ServerConfig, ServerSettings

__all__ = ["ServerConfig", "ServerSettings", "create_app", "run_server"]
