"""Scoring inferred networks against a reference: BEELINE metrics and held-out priors.

Metrics as BEELINE defines them (Pratapa et al. 2020, "Benchmarking algorithms for
gene regulatory network inference from single-cell transcriptomic data", Nature Methods
17:147, doi:10.1038/s41592-019-0690-6):

* **AUPRC**: area under the precision-recall curve of the edge ranking (average
  precision, :func:`sklearn.metrics.average_precision_score`) over a universe of
  candidate directed pairs (default: every ordered pair of distinct genes);
* **AUPRC ratio**: AUPRC over the edge density (the AUPRC of a random ranking);
* **EPR** (early precision ratio): precision among the top-k edges, k = number of true
  edges (edges tied with the k-th score are included), over the edge density;
* **sign accuracy**: among true edges in the top k with a non-zero sign, the fraction
  whose inferred sign matches the true one.

:func:`holdout_prior` and :func:`holdout_auprc` implement the held-out-edge protocol
(PMF-GRN's validation; Skok Gibbs et al. 2024, Genome Biology 25:88,
doi:10.1186/s13059-024-03226-6): hide a fraction of each regulator's prior targets,
infer with the rest, and rank the hidden edges among the regulator's non-prior pairs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

from scribe_stan.grn_prior import GrnPrior


def _universe(genes, regulators=None):
    genes = [str(g) for g in genes]
    regs = genes if regulators is None else [str(r) for r in regulators]
    idx = pd.MultiIndex.from_tuples([(r, t) for r in regs for t in genes if r != t],
                                    names=["regulator", "target"])
    return idx


def edge_metrics(edges, truth, genes, *, regulators=None):
    """BEELINE metrics of an inferred edge table against true edges.

    Parameters
    ----------
    edges : pandas.DataFrame
        ``regulator``, ``target``, ``score`` (and ``sign`` for sign accuracy); pairs
        missing from it score 0.
    truth : pandas.DataFrame
        True edges: ``regulator``, ``target``, optional ``sign``.
    genes : sequence of str
        Genes of the universe of candidate pairs.
    regulators : sequence of str, optional
        Restrict the universe to these regulators.

    Returns
    -------
    dict
        ``auprc``, ``auprc_ratio``, ``epr``, ``sign_accuracy`` (NaN without signed
        recovered edges), ``density``, ``n_true``, ``n_pairs``.

    Raises
    ------
    ValueError
        No true edge in the universe.
    """
    uni = _universe(genes, regulators)
    score = (edges.set_index(["regulator", "target"])["score"]
             .groupby(level=[0, 1]).max().reindex(uni).fillna(0.0).to_numpy())
    tr = truth.copy()
    tr["regulator"] = tr["regulator"].astype(str)
    tr["target"] = tr["target"].astype(str)
    tset = tr.set_index(["regulator", "target"])
    labels = uni.isin(tset.index)
    n_true = int(labels.sum())
    if n_true == 0:
        raise ValueError("no true edge among the candidate pairs; check gene names")
    density = n_true / len(uni)
    auprc = float(average_precision_score(labels, score)) if score.max() > 0 else density
    kth = np.sort(score)[::-1][n_true - 1]
    top = score >= kth if kth > 0 else score > 0
    epr = float(labels[top].mean() / density) if top.any() else 0.0
    sign_acc = np.nan
    if "sign" in edges and "sign" in tr:
        sg = (edges.set_index(["regulator", "target"])["sign"].groupby(level=[0, 1]).first()
              .reindex(uni).fillna(0).to_numpy())
        tsign = tset["sign"].groupby(level=[0, 1]).first().reindex(uni).fillna(0).to_numpy()
        sel = top & labels & (sg != 0) & (tsign != 0)
        if sel.any():
            sign_acc = float(np.mean(np.sign(sg[sel]) == np.sign(tsign[sel])))
    return {"auprc": auprc, "auprc_ratio": auprc / density, "epr": epr,
            "sign_accuracy": sign_acc, "density": density, "n_true": n_true,
            "n_pairs": len(uni)}


def simulated_prior(truth_edges, genes, *, recall, false_per_true, rng,
                    regulators=None, shuffle=False):
    """A prior of given quality for a simulated network.

    Keeps a fraction ``recall`` of the true edges and adds ``false_per_true`` false
    edges per true edge (uniform among non-edges from the regulators); ``shuffle``
    instead puts the true topology on randomly permuted gene labels (same size and
    degrees, wrong genes). Confidence 1; the true sign on true edges, 0 on false ones.

    Returns
    -------
    GrnPrior or None (no edge)
    """
    genes = [str(g) for g in genes]
    te = truth_edges.copy()
    te["regulator"] = [genes[int(i)] if not isinstance(i, str) else i for i in te["regulator"]]
    te["target"] = [genes[int(i)] if not isinstance(i, str) else i for i in te["target"]]
    regs = sorted(set(te["regulator"])) if regulators is None else list(regulators)
    if shuffle:  # the true topology on randomly permuted gene labels
        perm = dict(zip(genes, rng.permutation(genes)))
        rows = [(perm[r], perm[t]) for r, t in zip(te["regulator"], te["target"])]
        frame = pd.DataFrame(rows, columns=["regulator", "target"]).assign(confidence=1.0,
                                                                            sign=0)
    else:
        keep = rng.uniform(size=len(te)) < recall
        kept = te.loc[keep, ["regulator", "target"]].assign(
            confidence=1.0, sign=np.asarray(te.loc[keep, "sign"], int))
        truth_set = set(zip(te["regulator"], te["target"]))
        n_false = int(round(false_per_true * len(te)))
        cand = [(r, t) for r in regs for t in genes if r != t and (r, t) not in truth_set]
        pick = rng.choice(len(cand), size=min(n_false, len(cand)), replace=False)
        false = pd.DataFrame([cand[i] for i in pick], columns=["regulator", "target"]).assign(
            confidence=1.0, sign=0)
        frame = pd.concat([kept, false], ignore_index=True)
    if frame.empty:
        return None
    from scribe_stan.grn_prior import read_prior

    return read_prior(frame, name="simulated")


def holdout_prior(prior, *, fraction=0.2, rng, min_targets=2):
    """Split a prior into (kept, hidden): ``fraction`` of each regulator's targets hidden.

    Regulators with fewer than ``min_targets`` targets keep all of them.

    Returns
    -------
    kept : GrnPrior;  hidden : pandas.DataFrame (regulator, target, confidence, sign)
    """
    e = prior.edges
    hide = np.zeros(len(e), bool)
    for _, rows in e.groupby("regulator").indices.items():
        if len(rows) >= min_targets:
            n = max(1, int(round(fraction * len(rows))))
            hide[rng.choice(rows, size=n, replace=False)] = True
    kept = GrnPrior(e.loc[~hide].reset_index(drop=True), prior.sources)
    return kept, e.loc[hide].reset_index(drop=True)


def holdout_auprc(edges, hidden, kept, genes, *, n_boot=200, rng):
    """AUPRC ratio of hidden prior edges among each regulator's non-prior pairs.

    Universe: pairs (regulator of ``hidden``, gene) not in ``kept`` and not self-pairs;
    positives: the hidden edges. The interval is a bootstrap over regulators (95%).

    Returns
    -------
    dict: ``auprc``, ``auprc_ratio``, ``ratio_low``, ``ratio_high``, ``n_hidden``,
    ``n_pairs``, ``n_regulators``.
    """
    genes = [str(g) for g in genes]
    regs = sorted(set(hidden["regulator"]))
    kept_set = set(zip(kept.edges["regulator"], kept.edges["target"]))
    hid_set = set(zip(hidden["regulator"], hidden["target"]))
    sc = edges.set_index(["regulator", "target"])["score"].groupby(level=[0, 1]).max()
    per = {}
    for r in regs:
        pairs = [(r, t) for t in genes if t != r and (r, t) not in kept_set]
        idx = pd.MultiIndex.from_tuples(pairs)
        s = sc.reindex(idx).fillna(0.0).to_numpy()
        y = np.array([p in hid_set for p in pairs])
        per[r] = (s, y)

    def ratio(rs):
        s = np.concatenate([per[r][0] for r in rs])
        y = np.concatenate([per[r][1] for r in rs])
        if y.sum() == 0:
            return np.nan, np.nan
        ap = average_precision_score(y, s) if s.max() > 0 else y.mean()
        return float(ap), float(ap / y.mean())

    ap, rat = ratio(regs)
    boots = [ratio(list(rng.choice(regs, size=len(regs), replace=True)))[1]
             for _ in range(n_boot)]
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    n_pairs = sum(len(v[0]) for v in per.values())
    return {"auprc": ap, "auprc_ratio": rat, "ratio_low": float(lo), "ratio_high": float(hi),
            "n_hidden": int(len(hid_set)), "n_pairs": int(n_pairs), "n_regulators": len(regs)}
