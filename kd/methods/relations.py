"""Relation methods: the student is taught the relations between the samples of a batch (or
between its own stages) that the teacher's features hold, not the features themselves, so they
need no connector and own no parameters.

- sp: similarity-preserving KD (Tung & Mori, ICCV 2019), CE + 3000 * the squared distance
  between the batch's row-normalised Gram matrices of the last stage;
- rkd: relational KD (Park et al., CVPR 2019), CE + 25 * distance term + 50 * angle term on the
  pooled features;
- pkt: probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), CE + 30000 * a KL-like
  divergence between the cosine-similarity distributions of the pooled features;
- kdsvd: KD with SVD (Lee et al., ECCV 2018), CE + 1 * the squared distance between the RBF
  relations of consecutive stages' leading singular vectors.

Each with its authors' CIFAR-100 configuration (mdistiller engine/cfg.py; the four configs in
configs/cifar100/ change none of it) and, for the math, the code of mdistiller
(distillers/SP.py, RKD.py, PKT.py) and RepDistiller (distiller_zoo/KDSVD.py: see KDSVD for why
not mdistiller's). The teacher's side of each term is computed without gradient.
"""
import torch
import torch.nn.functional as F

from kd.methods.base import Distiller, stage_names
from kd.methods.registry import HyperParameter, register_distiller

# RKD (mdistiller CFG.RKD): pairwise distances, not squared, clamped at eps before the root;
# CFG.RKD.LOSS.FEAT_WEIGHT is 1, so the two weights are beta and gamma as they stand
RKD_DISTANCE_WEIGHT = 25.0   # CFG.RKD.DISTANCE_WEIGHT
RKD_ANGLE_WEIGHT = 50.0      # CFG.RKD.ANGLE_WEIGHT
RKD_SQUARED = False          # CFG.RKD.PDIST.SQUARED
RKD_EPS = 1e-12              # CFG.RKD.PDIST.EPSILON
# PKT: the eps of pkt_loss (mdistiller and the authors' cosine_similarity_loss)
PKT_EPS = 1e-7
# KDSVD: singular vectors the teacher gives (mdistiller CFG.KDSVD.K; the default of kdsvd's
# setting 'k'); the student gives K + 3, among which each teacher vector picks its match;
# RBF(x, y) = exp(-(x - y)^2 / 8)
KDSVD_K = 1
KDSVD_EXTRA_STUDENT_VECTORS = 3
KDSVD_RBF_SCALE = 8.0


def _finite(x):
    """x with its NaN and inf entries set to 0 (out of place: their gradient is 0)."""
    return torch.where(torch.isfinite(x), x, 0.0)


# ---------------------------------------------------------------------------------------------
# Similarity-preserving KD

def similarity_matrix(feat):
    """normalize_rows(F F^T) of the B x (C*H*W) flattened feature: B x B."""
    flat = feat.flatten(1)
    return F.normalize(flat @ flat.T)


def similarity_loss(fs, ft):
    """||G(T) - G(S)||_F^2 / B^2 (mdistiller's similarity_loss)."""
    b = fs.shape[0]
    with torch.no_grad():
        gt = similarity_matrix(ft)
    return (gt - similarity_matrix(fs)).pow(2).sum() / (b * b)


@register_distiller('sp', defaults={'beta': 3000.0}, parts=('ce', 'sp'),
                    help='loss = CE + beta*||G(T) - G(S)||_F^2 / B^2 (similarity-preserving KD, '
                         'Tung & Mori): G(F) the row-normalised B x B Gram matrix of the '
                         'flattened last stage; --beta weights it (3000).')
class SimilarityPreserving(Distiller):
    """Similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge Distillation",
    ICCV 2019), as mdistiller's SP (distillers/SP.py, CFG.SP.LOSS.FEAT_WEIGHT 3000):

        loss = CE + beta * ||G_T - G_S||_F^2 / B^2,  G = normalize_rows(F F^T)

    F the last stage of each model (mdistiller's feats[-1]: our last 'stageN', post-activation)
    flattened to B x (C*H*W); the two models' stages may differ in every size but the batch.
    The Gram matrices are B x B, in the features' dtype (float32, or float64)."""

    @classmethod
    def points(cls, student_shapes, teacher_shapes, params=None):
        names = []
        for who, shapes in (('student', student_shapes), ('teacher', teacher_shapes)):
            stages = stage_names(shapes)
            if not stages:
                raise ValueError(f'similarity-preserving KD: the {who} names no stages')
            names.append(stages[-1])
        return (names[0],), (names[1],)

    def distill(self, x):
        sp = similarity_loss(x.student_feats[self.student_points[0]],
                             x.teacher_feats[self.teacher_points[0]])
        return x.ce + self.params['beta'] * sp, {'ce': x.ce, 'sp': sp}


# ---------------------------------------------------------------------------------------------
# Relational KD

def pairwise_distances(e, squared=RKD_SQUARED, eps=RKD_EPS):
    """B x B Euclidean distances between the rows of e (B x D): from |a|^2 + |b|^2 - 2 a.b,
    clamped at eps (rounding can make it negative), rooted unless squared, the diagonal 0."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def normalised_distances(e):
    """The pairwise distances over their mean over the positive entries (the off-diagonal ones,
    as the clamp keeps them positive)."""
    d = pairwise_distances(e)
    positive = d > 0
    return d / (torch.where(positive, d, 0.0).sum() / positive.sum())


def triplet_angles(e):
    """cos of the angle at j of every triplet (i, j, k): <n(e_i - e_j), n(e_k - e_j)>, the
    differences L2-normalised; flattened, B^3."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)     # [j, i] = e_i - e_j
    return (diff @ diff.transpose(1, 2)).flatten()


def rkd_terms(fs, ft):
    """(distance term, angle term) of RKD: smooth L1 between the student's and the teacher's
    normalised distances, and between their triplet angles."""
    fs, ft = fs.flatten(1), ft.flatten(1)
    with torch.no_grad():
        dt, at = normalised_distances(ft), triplet_angles(ft)
    return (F.smooth_l1_loss(normalised_distances(fs), dt),
            F.smooth_l1_loss(triplet_angles(fs), at))


@register_distiller('rkd', defaults={'beta': RKD_DISTANCE_WEIGHT, 'gamma': RKD_ANGLE_WEIGHT},
                    parts=('ce', 'rkd_distance', 'rkd_angle'),
                    help='loss = CE + beta*D + gamma*A (relational KD, Park et al.): D the smooth '
                         'L1 between the mean-normalised pairwise distances of the student\'s '
                         'and the teacher\'s pooled features, A that between the cosines of '
                         'their triplets\' angles; --beta weights the distance term (25), '
                         '--gamma the angle term (50).')
class RelationalKD(Distiller):
    """Relational KD (Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019), as
    mdistiller's RKD (distillers/RKD.py, CFG.RKD: distance weight 25, angle weight 50, feature
    weight 1, distances not squared, eps 1e-12):

        loss = CE + beta * smoothL1(psi_D(S), psi_D(T)) + gamma * smoothL1(psi_A(S), psi_A(T))

    on the pooled features (B x D, the student's and the teacher's D may differ): psi_D the
    B x B pairwise distances over their mean over the positive entries, psi_A the B^3 cosines
    <n(x_i - x_j), n(x_k - x_j)>; both smooth L1 terms are means. The angle term holds
    B x B x D differences and B^3 cosines in the features' dtype (float32, or float64)."""

    @classmethod
    def points(cls, student_shapes, teacher_shapes, params=None):
        _require_pooled('relational KD', student_shapes, teacher_shapes)
        return ('pooled',), ('pooled',)

    def distill(self, x):
        distance, angle = rkd_terms(x.student_feats['pooled'], x.teacher_feats['pooled'])
        loss = x.ce + self.params['beta'] * distance + self.params['gamma'] * angle
        return loss, {'ce': x.ce, 'rkd_distance': distance, 'rkd_angle': angle}


def _require_pooled(method, student_shapes, teacher_shapes):
    for who, shapes in (('student', student_shapes), ('teacher', teacher_shapes)):
        if 'pooled' not in shapes:
            raise ValueError(f"{method}: the {who} has no pooled features ('pooled')")


# ---------------------------------------------------------------------------------------------
# Probabilistic knowledge transfer

def similarity_probabilities(f, eps=PKT_EPS):
    """Each row's distribution over the batch: (1 + cos(f_i, f_j)) / 2, normalised over j;
    the rows are scaled by 1 / (|f_i| + eps), NaN (from non-finite features) read as 0."""
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    f = torch.where(torch.isnan(f), 0.0, f)
    sim = (f @ f.T + 1.0) / 2.0
    return sim / sim.sum(1, keepdim=True)


def pkt_divergence(fs, ft, eps=PKT_EPS):
    """mean over i, j of P_T log((P_T + eps) / (P_S + eps)) (mdistiller's pkt_loss)."""
    with torch.no_grad():
        pt = similarity_probabilities(ft, eps)
    ps = similarity_probabilities(fs, eps)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


@register_distiller('pkt', defaults={'beta': 30000.0}, parts=('ce', 'pkt'),
                    help='loss = CE + beta*mean P_T log((P_T + eps)/(P_S + eps)) (probabilistic '
                         'knowledge transfer, Passalis & Tefas): P the row-normalised '
                         '(1 + cosine)/2 similarities of the batch\'s pooled features; --beta '
                         'weights it (30000).')
class ProbabilisticKT(Distiller):
    """Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with
    Probabilistic Knowledge Transfer", ECCV 2018), as mdistiller's PKT (distillers/PKT.py, the
    authors' cosine_similarity_loss; CFG.PKT.LOSS.FEAT_WEIGHT 30000):

        P_ij = (1 + cos(f_i, f_j)) / 2 / sum_k (1 + cos(f_i, f_k)) / 2
        loss = CE + beta * mean_ij P^T_ij log((P^T_ij + eps) / (P^S_ij + eps)),  eps 1e-7

    on the pooled features (B x D, the student's and the teacher's D may differ); the norms
    take + eps, and NaN entries of the normalised features are zeroed as the authors do (with
    torch.where, not in place). B x B matrices in the features' dtype (float32, or float64)."""

    @classmethod
    def points(cls, student_shapes, teacher_shapes, params=None):
        _require_pooled('probabilistic knowledge transfer', student_shapes, teacher_shapes)
        return ('pooled',), ('pooled',)

    def distill(self, x):
        pkt = pkt_divergence(x.student_feats['pooled'], x.teacher_feats['pooled'])
        return x.ce + self.params['beta'] * pkt, {'ce': x.ce, 'pkt': pkt}


# ---------------------------------------------------------------------------------------------
# KD with SVD

def leading_singular(feat, n):
    """(s, V) of the SVD of feat (B x C x H x W) read as B matrices of H*W samples x C channels:
    the n largest singular values, L2-normalised (B x n), and their right singular vectors
    (B x C x n, unit columns); NaN and inf read as 0. torch.linalg.svd, the routine behind the
    deprecated torch.svd the authors call: the same vectors, signs included."""
    x = feat.flatten(2).transpose(1, 2)                              # B x (H*W) x C
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    s = F.normalize(_finite(s)[:, :n], dim=1)
    v = F.normalize(_finite(vh.mT)[:, :, :n], dim=1)
    return s, v


def align_vectors(vs, vt):
    """The student's vectors (B x C x m) matched to the teacher's (B x C x k): for each teacher
    vector, the student vector of largest |cosine|, times that cosine's sign: B x C x k (the
    authors' align_rsv, which would add up exact ties; those are of measure zero)."""
    cosine = vs.mT @ vt                                              # B x m x k
    best = cosine.abs().argmax(1, keepdim=True)                      # B x 1 x k
    sign = cosine.gather(1, best).sign()
    return vs.gather(2, best.expand(-1, vs.shape[1], -1)) * sign


def stage_relation(v, v_prev):
    """RBF(v[c], v_prev[c']) = exp(-(v[c] - v_prev[c'])^2 / 8) for every pair of channels of two
    consecutive stages and every vector: B x C_j x C_(j-1) x k."""
    return torch.exp(-(v[:, :, None, :] - v_prev[:, None, :, :]).pow(2) / KDSVD_RBF_SCALE)


def kdsvd_loss(student_stages, teacher_stages, k=KDSVD_K):
    """sum over consecutive stage pairs (j-1, j) of sum (RBF_S - RBF_T)^2 / B, the entries that
    are not finite read as 0. Per stage: the teacher's k leading singular vectors V_T and the
    student's k + 3 aligned to them, both scaled by the teacher's normalised singular values."""
    loss, previous = 0.0, None
    for fs, ft in zip(student_stages, teacher_stages):
        with torch.no_grad():
            st, vt = leading_singular(ft, k)
        _, vs = leading_singular(fs, k + KDSVD_EXTRA_STUDENT_VECTORS)
        vs = align_vectors(vs, vt) * st[:, None, :]
        vt = vt * st[:, None, :]
        if previous is not None:
            with torch.no_grad():
                rt = stage_relation(vt, previous[1])
            loss = loss + _finite((stage_relation(vs, previous[0]) - rt).pow(2)).sum()
        previous = vs, vt
    return loss / student_stages[0].shape[0]


@register_distiller('kdsvd', defaults={'beta': 1.0}, parts=('ce', 'kdsvd'),
                    settings=(HyperParameter(
                        'k', 'k', 'singular vectors K', default=KDSVD_K, low=1, integer=True,
                        axis=False, help='the teacher\'s leading singular vectors per stage '
                                         '(1; the student gives K + 3)'),),
                    help='loss = CE + beta*sum_j ||RBF(V_S,j, V_S,j-1) - RBF(V_T,j, V_T,j-1)||^2 '
                         '/ B (KD with SVD, Lee et al.): V_j the leading right singular vector of '
                         'stage j (H*W samples x C channels), the student\'s picked among 4 and '
                         'sign-aligned to the teacher\'s; --beta weights it (1).')
class KDSVD(Distiller):
    """KD with SVD (Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular
    Value Decomposition", ECCV 2018), as RepDistiller's KDSVD (distiller_zoo/KDSVD.py, a port of
    the authors' TensorFlow code) with mdistiller's configuration (CFG.KDSVD: K 1, feature
    weight 1) over the stages zipped in order (feats[1:]: stage j with stage j, as zip
    truncates):

        per stage j: s_T, V_T = top-K of svd(T_j),  V_S = align(top-(K+3) of svd(S_j), V_T)
        loss = CE + beta * sum_j>1 sum_(b,c,c',i) (RBF(s_T V_S)_j - RBF(s_T V_T)_j)^2 / B

    svd of each map as an (H*W) x C matrix (the authors' NHWC reshape; mdistiller's port
    reshapes NCHW to (C*H) x W instead), s the K largest singular values L2-normalised (1 for
    K = 1), V their right singular vectors (C-dim); align picks, for each teacher vector, the
    student vector of largest |cosine|, with its sign; RBF(v_j, v_j-1)[c, c'] =
    exp(-(v_j[c] - v_j-1[c'])^2 / 8); non-finite entries read as 0. The zipped stages must
    have equal channels (the cosines pair them). The student's SVD is differentiated (a
    batched SVD of B x (H*W) x C per stage); everything is in the features' dtype (float32, or
    float64)."""

    @classmethod
    def points(cls, student_shapes, teacher_shapes, params=None):
        pairs = list(zip(stage_names(student_shapes), stage_names(teacher_shapes)))
        if len(pairs) < 2:  # the loss relates consecutive stages
            raise ValueError('KD with SVD: the student and the teacher need two stages or more')
        for a, b in pairs:
            if student_shapes[a][1] != teacher_shapes[b][1]:
                raise ValueError(f'KD with SVD: {a} has {student_shapes[a][1]} channels in the '
                                 f'student and {teacher_shapes[b][1]} in the teacher; the '
                                 f'stages it pairs need equal channels')
        return tuple(a for a, _ in pairs), tuple(b for _, b in pairs)

    def distill(self, x):
        kdsvd = kdsvd_loss([x.student_feats[p] for p in self.student_points],
                           [x.teacher_feats[p] for p in self.teacher_points], self.params['k'])
        return x.ce + self.params['beta'] * kdsvd, {'ce': x.ce, 'kdsvd': kdsvd}
