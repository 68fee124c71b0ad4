"""What CKKS aggregation (TenSEAL, gradinv.integrations.he) costs per client and how precise its decrypted sum is:
LeNet, CNN6 and ConvNet-64 (untrained, seed 0), 2 / 4 / 8 clients holding one 32x32 photo each (FedSGD), TenSEAL's
tutorial parameters (degree 8192, moduli [60, 40, 40, 60], scale 2**40). Per round: encryption seconds and
ciphertext bytes per client against the update's plain float32 bytes, the server's deserialise-and-add seconds,
the decryption seconds, and the decrypted sum's error against the plain sample-weighted mean. One round per row
(CKKS noise differs between runs; the times are single measurements). Writes OUT/he_costs.{json,md}.
Usage: python bench/he_costs.py --threads 1
"""

from __future__ import annotations

import math
import time

import torch

from _common import parser, setup, write_results
from gradinv.data import load_dataset, sample_batch
from gradinv.fl.functional import stateless_twin
from gradinv.fl.protocols import FedSGD, aggregate, client_update
from gradinv.integrations.he import CKKSAggregator
from gradinv.models import build_model
from gradinv.types import named_state

MODELS = ("lenet", "cnn6", "convnet")
CLIENTS = (2, 4, 8)


def client_updates(model_name: str, clients: int, dataset) -> list[dict[str, torch.Tensor]]:
    """Each client's FedSGD gradient on its own photo (the batch of seed 0, one image a client)."""
    model = build_model(model_name, num_classes=dataset.num_classes, seed=0)
    params, buffers = named_state(model)
    twin = stateless_twin(model, train_mode=False)
    images, labels = sample_batch(dataset, batch_size=clients, seed=0)
    inputs = dataset.normalization.normalize(images)
    with torch.no_grad():
        return [
            client_update(FedSGD(), twin, params, buffers, inputs[i : i + 1], labels[i : i + 1]) for i in range(clients)
        ]


def main() -> None:
    args = parser(__doc__).parse_args()
    run = setup(args)  # threads pinned (TenSEAL's contexts take the same count) before anything is timed
    models, counts = (("lenet",), (2,)) if args.quick else (MODELS, CLIENTS)
    dataset = load_dataset("photos", image_size=32, channels=3)
    aggregator = CKKSAggregator()
    rows = []
    for model_name in models:
        for clients in counts:
            updates = client_updates(model_name, clients, dataset)
            sizes = [1] * clients
            start = time.perf_counter()
            aggregate(updates, sizes)
            plain_seconds = time.perf_counter() - start
            costs = aggregator.aggregate(updates, sizes).costs
            rows.append({"model": model_name, "plain_mean_seconds": plain_seconds, **costs.to_dict()})
            print(f"{model_name} x{clients}: {sum(costs.encrypt_seconds) / clients:.2f} s/client", flush=True)
    lines = [
        f"CKKS aggregation (TenSEAL {_tenseal_version()}; degree {aggregator.poly_modulus_degree}, moduli "
        f"{list(aggregator.coeff_mod_bit_sizes)}, scale 2**{math.log2(aggregator.global_scale):g}; "
        f"{aggregator.slots} values per ciphertext; {run['threads']} thread(s); one round per row)",
        "",
        "| model | values | clients | ciphertexts / client | plain KB / client | ciphertext MB / client | expansion "
        "| encrypt s / client | server add s | decrypt s | plain mean s | max abs error | relative error |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        n = r["clients"]
        lines.append(
            f"| {r['model']} | {r['values']:,} | {n} | {r['ciphertexts']} | {r['plain_bytes'] / 1e3:.1f} "
            f"| {sum(r['ciphertext_bytes']) / n / 1e6:.1f} | {r['expansion']:.0f}x "
            f"| {sum(r['encrypt_seconds']) / n:.3f} | {r['server_add_seconds']:.3f} | {r['decrypt_seconds']:.3f} "
            f"| {r['plain_mean_seconds']:.4f} | {r['max_abs_error']:.1e} | {r['relative_error']:.1e} |"
        )
    public = rows[0]["public_context_bytes"]
    lines += [
        "",
        f"The server's public context (no secret, relinearisation or Galois keys) is {public / 1e3:.0f} KB, sent once; "
        "key generation took "
        f"{min(r['keygen_seconds'] for r in rows):.2f}-{max(r['keygen_seconds'] for r in rows):.2f} s. Encrypt: "
        "flatten, weight by n_i/N, encrypt and serialise one client's update. Server add: deserialise and add "
        "every client's ciphertexts. Errors: the decrypted weighted mean (cast back to float32) against the plain "
        "one; relative error = L2 norm of the difference over the plain mean's.",
    ]
    write_results(args.out, "he_costs", run, {"rows": rows}, "\n".join(lines))


def _tenseal_version() -> str:
    import tenseal

    return getattr(tenseal, "__version__", "?")


if __name__ == "__main__":
    main()
