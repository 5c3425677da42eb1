"""Client-side and server-side authentication: SCRAM-SHA-256 (via scramp), md5, cleartext and trust, sans-IO."""

from proxy.auth.client_auth import AuthenticationFailed, ClientAuthenticator, client_authenticator
from proxy.auth.secrets import AuthMethod, UserSecret
from proxy.auth.server_auth import ServerAuthenticator, ServerAuthError

__all__ = [
    "AuthMethod",
    "AuthenticationFailed",
    "ClientAuthenticator",
    "ServerAuthError",
    "ServerAuthenticator",
    "UserSecret",
    "client_authenticator",
]
