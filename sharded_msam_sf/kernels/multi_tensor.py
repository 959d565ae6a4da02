"""One C++/OpenMP kernel over a *list* of small fp32 CPU tensors: the many-small-tensors case.

A compiled (Inductor) call costs ~25 µs of CPU time, so tensors below
:data:`sharded_msam_sf.kernels.AUTO_MIN_NUMEL` take the foreach path, which moves every
intermediate through memory: 180 bytes per parameter per one_pass step, against the 44 the
algorithm needs (``benchmarks/step_profile.py``). Here the whole list is one call, as torch's
``_fused_adamw_`` and DeepSpeedCPUAdam do: the tensors are cut into chunks of at most
:data:`CHUNK` elements, the chunks shared among the OpenMP threads, and each element is read
and written once per pass —

- :func:`stats`: ``[Σ||β_m·m + (1 − β_m)·g||²]`` (float64 accumulation) and ``max|g|``
  (NaN if any g is NaN), the same quantities as the compiled statistics kernel;
- :func:`update_`: the update of :mod:`.compiled` (``_update_m_kernel`` with m, ``_update_kernel``
  without), the same formulas in fp32 with the scalars rounded to fp32 as there.

Only fp32 params, gradients and state, contiguous, on the CPU (:func:`eligible`); the rest stays
on the paths it had. The extension is built on first use by
``torch.utils.cpp_extension.load_inline`` (g++ with OpenMP, cached on disk under
``TORCH_EXTENSIONS_DIR``); a build failure is reported once by the caller and the foreach path
is used from then on.
"""
from __future__ import annotations

import threading
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .abstract import is_abstract

__all__ = ["CHUNK", "eligible", "load", "build_error", "stats", "update_"]

CHUNK = 1 << 14   # elements per work item: 64 KiB per fp32 array

_SOURCE = r"""
#include <torch/extension.h>
#include <omp.h>
#include <cmath>
#include <limits>
#include <vector>

namespace {
struct Item { int64_t t, begin, end; };

std::vector<Item> chunks(const std::vector<at::Tensor>& ts, int64_t chunk) {
  std::vector<Item> items;
  for (int64_t t = 0; t < (int64_t)ts.size(); ++t) {
    int64_t n = ts[t].numel();
    for (int64_t b = 0; b < n; b += chunk) items.push_back({t, b, std::min(n, b + chunk)});
  }
  return items;
}

template <typename T> std::vector<T*> ptrs(const std::vector<at::Tensor>& ts) {
  std::vector<T*> out;
  for (auto& t : ts) out.push_back(t.data_ptr<T>());
  return out;
}
}  // namespace

// [sumsq (of m_new = bm*m + omb*g; with_m false: 0), max|g| (NaN if any g is NaN)]
std::vector<double> stats(std::vector<at::Tensor> ms, std::vector<at::Tensor> gs, double bm_, double omb_,
                          bool with_m, int64_t chunk) {
  const float bm = (float)bm_, omb = (float)omb_;
  auto items = chunks(gs, chunk);
  auto G = ptrs<float>(gs);
  std::vector<float*> M = with_m ? ptrs<float>(ms) : std::vector<float*>();
  double sumsq = 0.0;
  float amax = 0.0f;
  int nan = 0;
  #pragma omp parallel for schedule(static) reduction(+:sumsq) reduction(max:amax) reduction(|:nan)
  for (int64_t k = 0; k < (int64_t)items.size(); ++k) {
    const Item it = items[k];
    const float* g = G[it.t];
    double acc = 0.0;
    float mx = 0.0f;
    int bad = 0;
    if (with_m) {
      const float* m = M[it.t];
      #pragma omp simd reduction(+:acc) reduction(max:mx) reduction(|:bad)
      for (int64_t i = it.begin; i < it.end; ++i) {
        float mn = m[i] * bm + g[i] * omb;
        acc += (double)mn * (double)mn;
        float a = std::fabs(g[i]);
        bad |= (a != a);
        mx = a > mx ? a : mx;
      }
    } else {
      #pragma omp simd reduction(max:mx) reduction(|:bad)
      for (int64_t i = it.begin; i < it.end; ++i) {
        float a = std::fabs(g[i]);
        bad |= (a != a);
        mx = a > mx ? a : mx;
      }
    }
    sumsq += acc;
    amax = mx > amax ? mx : amax;
    nan |= bad;
  }
  return {sumsq, nan ? std::numeric_limits<double>::quiet_NaN() : (double)amax};
}

// sc: lr, coef_y, beta2, one_minus_beta2, bc2, eps, wd, ckp1, beta_m, one_minus_beta_m, neg_remove, apply
void update(std::vector<at::Tensor> ps, std::vector<at::Tensor> gs, std::vector<at::Tensor> zs,
            std::vector<at::Tensor> vs, std::vector<at::Tensor> ms, bool with_m, std::vector<double> sc,
            int64_t chunk) {
  const float lr = sc[0], coef_y = sc[1], b2 = sc[2], omb2 = sc[3], bc2 = sc[4], eps = sc[5], wd = sc[6],
              w = sc[7], bm = sc[8], omb = sc[9], neg_remove = sc[10], apply = sc[11];
  const float one_minus_w = 1.0f - w;
  const bool low_w = std::fabs(w) < 0.5f;
  auto items = chunks(ps, chunk);
  auto P = ptrs<float>(ps), G = ptrs<float>(gs), Z = ptrs<float>(zs), V = ptrs<float>(vs);
  std::vector<float*> M = with_m ? ptrs<float>(ms) : std::vector<float*>();
  #pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < (int64_t)items.size(); ++k) {
    const Item it = items[k];
    float *p = P[it.t], *z = Z[it.t], *v = V[it.t];
    const float* g = G[it.t];
    if (with_m) {
      float* m = M[it.t];
      #pragma omp simd
      for (int64_t i = it.begin; i < it.end; ++i) {
        float gi = g[i], zi = z[i], mi = m[i];
        float y = p[i] + neg_remove * mi;
        float mn = mi * bm + omb * gi;
        float vn = v[i] * b2 + omb2 * (gi * gi);
        float u = gi / (std::sqrt(vn / bc2) + eps) + wd * y;
        float l = low_w ? y + w * (zi - y) : zi - (zi - y) * one_minus_w;
        float yn = l + coef_y * u;
        p[i] = yn + apply * mn;
        z[i] = zi - lr * u;
        v[i] = vn;
        m[i] = mn;
      }
    } else {
      #pragma omp simd
      for (int64_t i = it.begin; i < it.end; ++i) {
        float gi = g[i], zi = z[i], y = p[i];
        float vn = v[i] * b2 + omb2 * (gi * gi);
        float u = gi / (std::sqrt(vn / bc2) + eps) + wd * y;
        float l = low_w ? y + w * (zi - y) : zi - (zi - y) * one_minus_w;
        p[i] = l + coef_y * u;
        z[i] = zi - lr * u;
        v[i] = vn;
      }
    }
  }
}
"""

_lock = threading.Lock()
_module = {}


def build_error() -> Optional[str]:
    """Why the extension could not be built (None: built, or not tried yet)."""
    return _module.get("error")


def _cpu_tag() -> str:
    """A short hash of this CPU's feature flags: the build uses ``-march=native``, so a cached build
    must never be loaded on another kind of CPU (a shared home directory across node types would
    otherwise crash with an illegal instruction)."""
    import hashlib
    import platform
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags += line
                    break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def load():
    """The built extension (building it on first use), or None if the build failed."""
    if "mod" in _module or "error" in _module:
        return _module.get("mod")
    with _lock:
        if "mod" not in _module and "error" not in _module:
            try:
                import sys

                from torch.utils.cpp_extension import load_inline
                print("sharded_msam_sf: building the multi-tensor CPU kernel with g++ (once per CPU type; "
                      "cached under torch's extensions directory)", file=sys.stderr, flush=True)
                _module["mod"] = load_inline(
                    name=f"sharded_msam_sf_multi_tensor_v1_{_cpu_tag()}", cpp_sources=[_SOURCE],
                    functions=["stats", "update"],
                    extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-march=native"],
                    extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as err:  # noqa: BLE001 - any build failure: the caller falls back to foreach
                text = str(err).strip().splitlines()
                _module["error"] = f"{type(err).__name__}: {text[0] if text else ''}"
    return _module.get("mod")


def eligible(*tensors: Optional[Tensor]) -> bool:
    """fp32, contiguous, strided, on the CPU, holding data (not fake), all of the first tensor's size
    (None: absent)."""
    n = tensors[0].numel()
    return all(t is None or (t.device.type == "cpu" and not is_abstract(t) and t.dtype == torch.float32 and t.layout == torch.strided
                             and t.is_contiguous() and t.numel() == n) for t in tensors)


def stats(ms: Sequence[Tensor], gs: Sequence[Tensor], beta_m: Optional[float]) -> Tensor:
    """float64 ``[sumsq, amax]`` over the lists (``ms`` empty or ``beta_m`` None: sumsq 0)."""
    mod = load()
    with_m = bool(len(ms)) and beta_m is not None
    bm = 0.0 if beta_m is None else beta_m
    s, amax = mod.stats(list(ms) if with_m else [], list(gs), bm, 1.0 - bm, with_m, CHUNK)
    return torch.tensor([s, amax], dtype=torch.float64)


def update_(ps: List[Tensor], gs: List[Tensor], zs: List[Tensor], vs: List[Tensor], ms: Optional[List[Tensor]],
            scalars: List[float]) -> None:
    """The update of every tensor in the lists, in place (``scalars`` in the :mod:`.scalars` order)."""
    mod = load()
    mod.update(list(ps), list(gs), list(zs), list(vs), list(ms) if ms is not None else [], ms is not None,
               [float(x) for x in scalars], CHUNK)
