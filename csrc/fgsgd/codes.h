// Component codes, numbered exactly as fgsgd_cuda/codes.py.
#pragma once
#include "config.h"

FGSGD_NAMESPACE_BEGIN

enum Code : int {
  kEuclidean = 0,
  kSphereNormalize = 1,
  kSphereExp = 2,
  kObliqueNormalize = 3,
  kObliqueExp = 4,
  kStiefelQR = 5,
  kStiefelCayley = 6,
  kNumCodes = 7,
};

enum ManifoldId : int { kManEuclidean = 0, kManSphere = 1, kManOblique = 2, kManStiefel = 3 };

FGSGD_HD int manifold_of(int code) { return (code + 1) >> 1; }
FGSGD_HD int variant_of(int code) { return (code + 1) & 1; }  // 0: normalize / qr, 1: exp / cayley

FGSGD_NAMESPACE_END
