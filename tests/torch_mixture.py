"""The exact Gaussian-mixture velocity written independently in PyTorch (float64), for parity loops.

``u_t(x | c) = Σ_k w_k(x) u_k(x)`` with ``S_k = t²Σ_k + (1 − t)²I``, ``r_k = x − t·μ_k``,
``u_k = μ_k + (tΣ_k − (1 − t)I) S_k⁻¹ r_k`` and ``w = softmax_k(log π_k − ½ log det S_k −
½ r_kᵀ S_k⁻¹ r_k)`` over the components of class ``c`` (all components for ``c = −1``),
computed with dense ``torch.linalg`` solves: no eigendecomposition, no chunking, nothing
shared with ``cfgzero_theory.mixture``.
"""

import numpy as np


class TorchMixture:
    def __init__(self, torch, weights, means, covs, labels):
        self.torch = torch
        self.weights = torch.tensor(np.array(weights, np.float64))
        self.means = torch.tensor(np.array(means, np.float64))
        self.covs = torch.tensor(np.array(covs, np.float64))
        self.labels = torch.tensor(np.array(labels))

    def theory_velocity(self, x, t, label):
        """``u_t(x | label)`` for ``x`` ``(B, d)`` (any float dtype), label an int (−1: unconditional)."""
        torch = self.torch
        x64 = x.to(torch.float64)
        keep = torch.ones_like(self.labels, dtype=torch.bool) if label < 0 else self.labels == label
        pi, mu, cov = self.weights[keep], self.means[keep], self.covs[keep]
        d = x64.shape[1]
        eye = torch.eye(d, dtype=torch.float64)
        s = t**2 * cov + (1 - t) ** 2 * eye  # (K, d, d)
        r = x64[:, None, :] - t * mu[None]  # (B, K, d)
        s_inv_r = torch.linalg.solve(s[None].expand(x64.shape[0], -1, -1, -1), r[..., None])[..., 0]
        logits = torch.log(pi / pi.sum()) - 0.5 * torch.logdet(s) - 0.5 * (r * s_inv_r).sum(-1)
        w = torch.softmax(logits, dim=1)
        u_k = mu[None] + torch.einsum("kij,bkj->bki", t * cov - (1 - t) * eye, s_inv_r)
        return (w[..., None] * u_k).sum(1)

    def sigma_prediction(self, latents, sigma, label):
        """Diffusers' σ-convention prediction ``v_σ = −u_{1−σ}`` for latents of any shape ``(B, ...)``."""
        flat = latents.reshape(latents.shape[0], -1)
        return (-self.theory_velocity(flat, 1 - float(sigma), label)).reshape(latents.shape).to(latents.dtype)
