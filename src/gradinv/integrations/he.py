"""Homomorphic aggregation with CKKS (Cheon et al. 2017) through TenSEAL: ``pip install gradinv[he]``.

The clients encrypt their updates, the server adds the ciphertexts without being able to read them, and only
the sum is decrypted. Who holds what, as in the usual HE federated set-up (the TenSEAL examples of NVIDIA FLARE
and Flower; Zhang et al. 2020, BatchCrypt):

- the clients share one CKKS context *with* the secret key (a key holder makes it and hands it to them);
- the server holds that context serialised *without* it (``context.serialize(save_secret_key=False)``): it
  deserialises the clients' ciphertexts and adds them, and cannot decrypt them;
- the key holders decrypt the sum only. The model it updates is public (the server sends it next round), so
  the server, and a gradient-inversion attack, end up with the decrypted sum: HE hides each client's update
  from the server as secure aggregation does, and reveals the same aggregate.

Each client flattens its update by parameter name (sorted), pre-scales it by its weight ``n_i / N`` (so the
sum is the sample-weighted mean of :func:`gradinv.fl.protocols.aggregate`), encrypts it in chunks of
``poly_modulus_degree / 2`` slots and serialises the ciphertexts (what it sends, counted in bytes). Nothing is
multiplied under encryption, so the defaults (TenSEAL's tutorial parameters: degree 8192, moduli
[60, 40, 40, 60] bits, scale 2**40, 128-bit security) have levels to spare.

Determinism: CKKS encryption is randomised (SEAL draws fresh noise and takes no seed), so the decrypted sum
differs from the plain mean, and between runs, by CKKS noise (about 1e-8 absolute per value at the defaults):
results are deterministic to CKKS precision, not bitwise.

Only this module imports TenSEAL, and only inside its functions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from gradinv.errors import ConfigError, DataError, ShapeError

if TYPE_CHECKING:
    import tenseal

#: SEAL's largest total coefficient-modulus bits for 128-bit security, by polynomial degree (CoeffModulus::MaxBitCount)
MAX_MODULUS_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


def require_tenseal() -> Any:
    """The ``tenseal`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        import tenseal
    except ImportError:
        raise ConfigError("CKKS aggregation needs TenSEAL: pip install gradinv[he] (or pip install tenseal)") from None
    return tenseal


@dataclass(frozen=True, eq=False)
class CKKSKeys:
    """One deployment's keys. ``client``: the context with the secret key, which the clients (key holders)
    share; ``server``: the context the server deserialised from ``public_bytes`` (no secret key: it adds
    ciphertexts and cannot decrypt them)."""

    client: tenseal.Context
    server: tenseal.Context
    public_bytes: int
    seconds: float


@dataclass(frozen=True)
class EncryptedUpdate:
    """What one client sends: its weighted, flattened update as serialised CKKS ciphertexts."""

    chunks: tuple[bytes, ...]
    #: the client's time to flatten, weight, encrypt and serialise its update
    seconds: float

    @property
    def nbytes(self) -> int:
        """Bytes on the wire."""
        return sum(len(c) for c in self.chunks)


@dataclass(frozen=True)
class CKKSCosts:
    """What one CKKS round cost, per client and at the server, and how precise its decrypted sum is."""

    clients: int
    #: numbers in one update, and the ciphertexts (chunks of ``slots`` numbers) each client sends
    values: int
    ciphertexts: int
    #: one client's update in its own dtype (float32: 4 bytes a number), and its ciphertexts' serialised bytes
    plain_bytes: int
    ciphertext_bytes: tuple[int, ...]
    encrypt_seconds: tuple[float, ...]
    #: the server's context without the secret key, sent once per deployment
    public_context_bytes: int
    keygen_seconds: float
    #: the server's deserialisation and addition of every client's ciphertexts
    server_add_seconds: float
    decrypt_seconds: float
    #: the decrypted sum against the plain sample-weighted mean: largest absolute difference, and the difference's
    #: L2 norm over the plain mean's (all parameters flattened)
    max_abs_error: float
    relative_error: float

    @property
    def expansion(self) -> float:
        """Ciphertext bytes per plain byte (mean over clients)."""
        return sum(self.ciphertext_bytes) / len(self.ciphertext_bytes) / max(self.plain_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON values, with the expansion."""
        out = asdict(self)
        out["ciphertext_bytes"] = list(self.ciphertext_bytes)
        out["encrypt_seconds"] = list(self.encrypt_seconds)
        out["expansion"] = self.expansion
        return out


@dataclass(frozen=True, eq=False)
class CKKSRound:
    """A round's aggregate (the decrypted weighted mean, by parameter name) and its costs."""

    update: dict[str, Tensor]
    costs: CKKSCosts


@dataclass(frozen=True)
class CKKSAggregator:
    """Sample-weighted mean of client updates under CKKS: clients encrypt, the server adds, the sum is decrypted.

    ``poly_modulus_degree`` sets the slots per ciphertext (half of it) and the security; ``coeff_mod_bit_sizes``
    the modulus chain (the last prime is SEAL's special prime); ``global_scale`` the fixed-point precision.
    :meth:`aggregate` runs a whole round; :meth:`keygen`, :meth:`encrypt` (client), :meth:`add` (server) and
    :meth:`decrypt` (key holders) are its steps, each using only what its party holds.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    global_scale: float = 2.0**40

    def __post_init__(self) -> None:
        if isinstance(self.coeff_mod_bit_sizes, list):
            object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every setting SEAL would refuse (or that cannot hold the scale), each with what is allowed."""
        problems = []
        degree, bits, scale = self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.global_scale
        if isinstance(degree, bool) or degree not in MAX_MODULUS_BITS:
            choices = ", ".join(map(str, MAX_MODULUS_BITS))
            problems.append(f"poly_modulus_degree must be one of {choices}, got {degree!r}")
        if (
            not isinstance(bits, tuple)
            or len(bits) < 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 60 for b in bits)
        ):
            problems.append(
                f"coeff_mod_bit_sizes must list at least 2 prime sizes of 1 to 60 bits, got {bits!r} "
                "(e.g. (60, 40, 40, 60))"
            )
        elif degree in MAX_MODULUS_BITS and sum(bits) > MAX_MODULUS_BITS[degree]:
            problems.append(
                f"coeff_mod_bit_sizes total {sum(bits)} bits, more than the {MAX_MODULUS_BITS[degree]} that "
                f"poly_modulus_degree {degree} allows at 128-bit security: drop a prime or raise the degree"
            )
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 1:
            problems.append(f"global_scale must be a finite number > 1 (e.g. 2**40), got {scale!r}")
        elif (
            isinstance(bits, tuple)
            and len(bits) >= 2
            and all(isinstance(b, int) for b in bits)
            and math.log2(scale) >= sum(bits[:-1])
        ):
            problems.append(
                f"global_scale 2**{math.log2(scale):g} does not fit the {sum(bits[:-1])}-bit modulus the "
                "ciphertexts carry (all primes but the last): lower the scale or add primes"
            )
        return problems

    @property
    def slots(self) -> int:
        """Numbers per ciphertext."""
        return self.poly_modulus_degree // 2

    def keygen(self) -> CKKSKeys:
        """The clients' secret context and the server's public one, deserialised from bytes without the secret
        key (nor relinearisation or Galois keys: the server only adds)."""
        ts = require_tenseal()
        start = time.perf_counter()
        try:
            client = ts.context(
                ts.SCHEME_TYPE.CKKS,
                poly_modulus_degree=self.poly_modulus_degree,
                coeff_mod_bit_sizes=list(self.coeff_mod_bit_sizes),
                n_threads=torch.get_num_threads(),
            )
        except ValueError as exc:
            raise ConfigError(f"TenSEAL refused these CKKS settings ({exc}): {self!r}") from None
        client.global_scale = self.global_scale
        public = client.serialize(
            save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )
        server = ts.context_from(public, n_threads=torch.get_num_threads())
        return CKKSKeys(client=client, server=server, public_bytes=len(public), seconds=time.perf_counter() - start)

    def encrypt(self, update: Mapping[str, Tensor], *, weight: float, keys: CKKSKeys) -> EncryptedUpdate:
        """A client's message: ``update`` flattened by sorted parameter name, times ``weight``, encrypted in
        chunks of :attr:`slots` numbers with the clients' context and serialised."""
        ts = require_tenseal()
        start = time.perf_counter()
        flat = _flatten(update) * float(weight)
        if not np.isfinite(flat).all():
            raise DataError("the update holds NaN or infinite values: CKKS cannot encrypt them")
        chunks = []
        for i in range(0, flat.size, self.slots):
            try:
                vector = ts.ckks_vector(keys.client, flat[i : i + self.slots])
            except ValueError as exc:  # SEAL: values too large for the scale and modulus
                raise ConfigError(
                    f"CKKS cannot encode this update ({exc}; largest |value| {float(np.abs(flat).max()):.3g}): "
                    "lower global_scale or add coefficient moduli"
                ) from None
            chunks.append(vector.serialize())
        return EncryptedUpdate(chunks=tuple(chunks), seconds=time.perf_counter() - start)

    def add(self, messages: Iterable[EncryptedUpdate], *, keys: CKKSKeys) -> list[tenseal.CKKSVector]:
        """The server's step: deserialise each message with the public context and add it to the running sum
        (one client's ciphertexts in memory at a time). The sum stays encrypted: the server cannot decrypt it."""
        total: list[tenseal.CKKSVector] | None = None
        for message in messages:
            total = _add_message(total, message, keys.server)
        if total is None:
            raise ConfigError("no client sent an update: aggregate at least one")
        return total

    def decrypt(
        self, total: Sequence[tenseal.CKKSVector], *, keys: CKKSKeys, like: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The key holders' step: decrypt the summed ciphertexts with the secret key and unflatten them into
        tensors shaped, typed and placed as ``like`` (by parameter name)."""
        secret = keys.client.secret_key()
        flat = np.concatenate([np.asarray(v.decrypt(secret), dtype=np.float64) for v in total])
        return _unflatten(flat, like)

    def aggregate(self, updates: Sequence[Mapping[str, Tensor]], sizes: Sequence[int]) -> CKKSRound:
        """One round: fresh keys, each client encrypts ``update * n_i / N``, the server adds as messages arrive,
        the key holders decrypt the sum. Returns the decrypted weighted mean and the round's costs (errors against
        the plain :func:`~gradinv.fl.protocols.aggregate`)."""
        from gradinv.fl.protocols import aggregate

        _check_round(updates, sizes)
        keys = self.keygen()
        total_n = sum(sizes)
        encrypt_seconds, nbytes = [], []
        total, add_seconds = None, 0.0
        for update, n in zip(updates, sizes, strict=True):
            message = self.encrypt(update, weight=n / total_n, keys=keys)
            encrypt_seconds.append(message.seconds)
            nbytes.append(message.nbytes)
            start = time.perf_counter()
            total = _add_message(total, message, keys.server)
            add_seconds += time.perf_counter() - start
        start = time.perf_counter()
        mean = self.decrypt(total, keys=keys, like=updates[0])
        decrypt_seconds = time.perf_counter() - start
        plain = aggregate(list(updates), list(sizes))
        diff = _flatten(mean) - _flatten(plain)
        reference = float(np.linalg.norm(_flatten(plain)))
        values = sum(t.numel() for t in updates[0].values())
        costs = CKKSCosts(
            clients=len(updates),
            values=values,
            ciphertexts=-(-values // self.slots),
            plain_bytes=sum(t.numel() * t.element_size() for t in updates[0].values()),
            ciphertext_bytes=tuple(nbytes),
            encrypt_seconds=tuple(encrypt_seconds),
            public_context_bytes=keys.public_bytes,
            keygen_seconds=keys.seconds,
            server_add_seconds=add_seconds,
            decrypt_seconds=decrypt_seconds,
            max_abs_error=float(np.abs(diff).max()) if diff.size else 0.0,
            relative_error=float(np.linalg.norm(diff)) / reference if reference > 0 else float(np.linalg.norm(diff)),
        )
        return CKKSRound(update=mean, costs=costs)


def _add_message(
    total: list[tenseal.CKKSVector] | None, message: EncryptedUpdate, context: tenseal.Context
) -> list[tenseal.CKKSVector]:
    ts = require_tenseal()
    vectors = [ts.ckks_vector_from(context, chunk) for chunk in message.chunks]
    if total is None:
        return vectors
    if len(vectors) != len(total):
        raise ShapeError(f"a client sent {len(vectors)} ciphertexts, the others {len(total)}: updates must match")
    for acc, vector in zip(total, vectors, strict=True):
        acc.add_(vector)  # in place: the running sum
    return total


def _flatten(update: Mapping[str, Tensor]) -> np.ndarray:
    """The update's values in float64, parameter by parameter in sorted name order."""
    if not update:
        raise ConfigError("the update has no parameters: nothing to aggregate")
    return np.concatenate([update[k].detach().to("cpu", torch.float64).reshape(-1).numpy() for k in sorted(update)])


def _unflatten(flat: np.ndarray, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``flat`` cut into ``like``'s tensors (sorted name order), each with its shape, dtype and device."""
    out, offset = {}, 0
    for k in sorted(like):
        t = like[k]
        piece = torch.from_numpy(flat[offset : offset + t.numel()].copy()).reshape(t.shape)
        out[k] = piece.to(device=t.device, dtype=t.dtype)
        offset += t.numel()
    if offset != flat.size:
        raise ShapeError(f"the decrypted sum holds {flat.size} numbers, the update {offset}")
    return {k: out[k] for k in like}


def _check_round(updates: Sequence[Mapping[str, Tensor]], sizes: Sequence[int]) -> None:
    if not updates or len(updates) != len(sizes):
        raise ConfigError(f"give one sample count per update: got {len(updates)} updates and {len(sizes)} counts")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ConfigError(f"sample counts must be positive integers, got {list(sizes)}")
    layout = {k: tuple(v.shape) for k, v in updates[0].items()}
    for i, update in enumerate(updates[1:], start=1):
        if {k: tuple(v.shape) for k, v in update.items()} != layout:
            raise ShapeError(f"client {i}'s update has other parameter names or shapes than client 0's")


__all__ = [
    "MAX_MODULUS_BITS",
    "CKKSAggregator",
    "CKKSCosts",
    "CKKSKeys",
    "CKKSRound",
    "EncryptedUpdate",
    "require_tenseal",
]
