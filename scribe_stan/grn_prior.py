"""Prior knowledge for GRN inference: regulator -> target edge tables and masks.

A prior is the external knowledge ``Omega`` of ``Theta_hat = argmin L_data(X, Theta) +
L_reg(Theta, Omega)`` (``seeds/grn_inference_external_knowledge.md``): a set of candidate
regulator -> target edges, each with a confidence in ``(0, 1]`` and an optional sign
(+1 activation, -1 repression, 0 unknown). :func:`read_prior` reads one source (a
DataFrame, a CSV/CSV.gz file such as DoRothEA's ``tf, target, confidence, mor``, or a
regulators x targets mask); :func:`combine_priors` merges several; :meth:`GrnPrior.match`
matches its gene names to a fit's genes and reports the names it does not know.

How the inference uses the prior (``support=`` of :func:`scribe_stan.grn_infer.infer_grn`):

* ``"hard"``: only prior edges may be non-zero (candidate regulators, as CellOracle;
  Kamimoto et al. 2023, Nature 614:742, doi:10.1038/s41586-022-05688-9);
* ``"soft"``: every pair may be non-zero, and a prior edge's penalty weight is
  ``1 / (1 + strength * confidence)`` (a per-edge prior scale, as PMF-GRN's prior
  means; Skok Gibbs et al. 2024, Genome Biology 25:88, doi:10.1186/s13059-024-03226-6).

Confidence labels: DoRothEA's letters map to :data:`LETTER_CONFIDENCE` (A = 1.0 strongest
evidence, ..., E = 0.2; Garcia-Alonso et al. 2019, Genome Research 29:1363,
doi:10.1101/gr.240663.118); numbers must lie in ``(0, 1]``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

#: DoRothEA evidence levels -> confidence in (0, 1].
LETTER_CONFIDENCE = {"A": 1.0, "B": 0.8, "C": 0.6, "D": 0.4, "E": 0.2}
#: Column names recognized for each field (first match wins, case-insensitive).
REGULATOR_COLUMNS = ("regulator", "tf", "source", "from")
TARGET_COLUMNS = ("target", "to")
CONFIDENCE_COLUMNS = ("confidence", "weight", "score")
SIGN_COLUMNS = ("sign", "mor", "mode_of_regulation")
#: How :func:`combine_priors` merges the confidence of an edge given by several sources.
COMBINE = ("noisy_or", "max", "mean")


@dataclass(frozen=True)
class GrnPrior:
    """Candidate regulator -> target edges with confidences and signs.

    Attributes
    ----------
    edges : pandas.DataFrame
        One row per distinct edge: ``regulator`` (str), ``target`` (str),
        ``confidence`` (float in (0, 1]), ``sign`` (int: +1, -1 or 0 unknown),
        ``source`` (str; sources joined by ``"+"`` after :func:`combine_priors`).
        Self-edges are dropped.
    """

    edges: pd.DataFrame
    sources: tuple = field(default=())

    @property
    def regulators(self):
        """Sorted unique regulator names."""
        return sorted(self.edges["regulator"].unique())

    @property
    def genes(self):
        """Sorted names of every gene in the prior (regulators and targets)."""
        return sorted(set(self.edges["regulator"]) | set(self.edges["target"]))

    def __len__(self):
        return len(self.edges)

    def match(self, genes, *, warn=True):
        """Restrict the prior to ``genes`` (e.g. a fit's ``var_names``).

        Parameters
        ----------
        genes : sequence of str, length G
            Gene names of the inference, in order.
        warn : bool
            Warn (``UserWarning``) with the count and the first unknown names.

        Returns
        -------
        matched : pandas.DataFrame
            The prior edges whose regulator and target are both in ``genes``, with
            integer columns ``reg_idx`` and ``tgt_idx`` (positions in ``genes``).
        unknown : list of str
            Prior gene names not in ``genes`` (sorted): reported, never silently dropped.

        Raises
        ------
        ValueError
            No prior edge has both ends in ``genes`` (empty support); the message gives
            the number of prior genes and a few examples of each side.
        """
        genes = pd.Index([str(g) for g in genes])
        pos = pd.Series(np.arange(len(genes)), index=genes)
        if pos.index.has_duplicates:
            raise ValueError("genes has duplicated names; pass unique gene names")
        e = self.edges
        keep = e["regulator"].isin(genes) & e["target"].isin(genes)
        unknown = sorted(set(self.genes) - set(genes))
        if not keep.any():
            raise ValueError(
                f"empty prior support: none of the {len(self)} prior edges has both its "
                f"regulator and its target among the {len(genes)} genes (prior genes e.g. "
                f"{self.genes[:5]}; genes e.g. {list(genes[:5])}); check gene naming "
                f"(symbols vs ids) or pass genes= that include the prior's regulators")
        if unknown and warn:
            warnings.warn(f"{len(unknown)} of {len(self.genes)} prior genes are not among "
                          f"the {len(genes)} genes and their edges are left out "
                          f"(e.g. {unknown[:5]}); see GrnResult.unknown_genes",
                          UserWarning, stacklevel=2)
        m = e.loc[keep].copy().reset_index(drop=True)
        m["reg_idx"] = pos.loc[m["regulator"]].to_numpy()
        m["tgt_idx"] = pos.loc[m["target"]].to_numpy()
        return m, unknown

    def confidence_matrix(self, genes):
        """Dense (G, G) confidence, ``[target, regulator]`` (Jacobian orientation).

        Zero where the prior has no edge. See :meth:`match` for the arguments and errors.
        """
        m, _ = self.match(genes, warn=False)
        C = np.zeros((len(genes), len(genes)))
        C[m["tgt_idx"].to_numpy(), m["reg_idx"].to_numpy()] = m["confidence"].to_numpy()
        return C

    def sign_matrix(self, genes):
        """Dense (G, G) sign ``[target, regulator]`` in {-1, 0, +1}."""
        m, _ = self.match(genes, warn=False)
        Sg = np.zeros((len(genes), len(genes)))
        Sg[m["tgt_idx"].to_numpy(), m["reg_idx"].to_numpy()] = m["sign"].to_numpy()
        return Sg


def _find_column(frame, wanted, given, what, required=True):
    if given is not None:
        if given not in frame.columns:
            raise ValueError(f"{what} column {given!r} not in the prior's columns "
                             f"{list(frame.columns)}")
        return given
    lower = {str(c).lower(): c for c in frame.columns}
    for w in wanted:
        if w in lower:
            return lower[w]
    if required:
        raise ValueError(f"the prior has no {what} column; expected one of {list(wanted)} "
                         f"(got columns {list(frame.columns)}), or pass {what}=")
    return None


def _confidence(values, levels):
    """Confidence values in (0, 1] from numbers or DoRothEA letters."""
    s = pd.Series(values)
    if s.dtype.kind in "biuf":
        conf = s.astype(float).to_numpy()
        bad = ~(np.isfinite(conf) & (conf > 0) & (conf <= 1))
        if bad.any():
            raise ValueError(f"confidence values must lie in (0, 1]; got "
                             f"{np.unique(conf[bad])[:5].tolist()} ({int(bad.sum())} edges)")
        return conf
    labels = s.astype(str).str.strip().str.upper()
    bad = sorted(set(labels) - set(LETTER_CONFIDENCE))
    if bad:
        raise ValueError(f"unknown confidence labels {bad[:5]}; allowed: numbers in (0, 1] "
                         f"or the letters {list(LETTER_CONFIDENCE)} (A strongest)")
    if levels is not None:
        levels = [str(v).upper() for v in levels]
        unknown = sorted(set(levels) - set(LETTER_CONFIDENCE))
        if unknown:
            raise ValueError(f"unknown levels {unknown}; allowed: {list(LETTER_CONFIDENCE)}")
    return labels.map(LETTER_CONFIDENCE).to_numpy(float)


def read_prior(source, *, regulator=None, target=None, confidence=None, sign=None,
               levels=None, name=None):
    """Read one source of prior knowledge into a :class:`GrnPrior`.

    Parameters
    ----------
    source : pandas.DataFrame, str or os.PathLike
        An edge table (one row per regulator -> target edge) or a CSV / CSV.gz path to
        one. Alternatively a *mask*: a DataFrame whose index holds regulators and whose
        columns hold targets, with non-zero entries as edges (values in (0, 1] are taken
        as confidences, booleans as confidence 1; a negative value gives sign -1 and
        confidence ``|value|``). A mask is recognized by having none of the edge-table
        column names.
    regulator, target, confidence, sign : str, optional
        Column names; by default the first of :data:`REGULATOR_COLUMNS`,
        :data:`TARGET_COLUMNS`, :data:`CONFIDENCE_COLUMNS`, :data:`SIGN_COLUMNS` present
        (case-insensitive; DoRothEA's ``tf, target, confidence, mor`` work as they are).
        Without a confidence column every edge gets 1; without a sign column, 0.
    levels : sequence of str, optional
        Keep only these letter levels (e.g. ``"ABCD"``).
    name : str, optional
        Source name stored in ``edges["source"]`` (default: the file name or "table").

    Returns
    -------
    GrnPrior
        Duplicated edges collapse to one (highest confidence; conflicting signs -> 0).

    Raises
    ------
    ValueError
        Missing columns (the message lists the columns found), confidence values outside
        (0, 1] or unknown labels (the allowed letters are listed), signs other than
        -1, 0, +1, or no edge left.
    FileNotFoundError
        ``source`` is a path that does not exist.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"prior file {path!r} does not exist")
        frame = pd.read_csv(path)
        name = name or os.path.basename(path)
    elif isinstance(source, pd.DataFrame):
        frame = source
    else:
        raise TypeError(f"prior source must be a DataFrame or a CSV path; got "
                        f"{type(source).__name__}")
    name = name or "table"
    lower = {str(c).lower() for c in frame.columns}
    is_table = (regulator is not None or bool(lower & set(REGULATOR_COLUMNS)))
    if not is_table:
        return _from_mask(frame, name)
    rc = _find_column(frame, REGULATOR_COLUMNS, regulator, "regulator")
    tc = _find_column(frame, TARGET_COLUMNS, target, "target")
    cc = _find_column(frame, CONFIDENCE_COLUMNS, confidence, "confidence", required=False)
    sc = _find_column(frame, SIGN_COLUMNS, sign, "sign", required=False)
    out = pd.DataFrame({"regulator": frame[rc].astype(str).to_numpy(),
                        "target": frame[tc].astype(str).to_numpy()})
    if cc is None:
        out["confidence"] = 1.0
    else:
        if levels is not None:
            if pd.Series(frame[cc]).dtype.kind in "biuf":
                raise ValueError("levels= selects letter confidence labels, but the "
                                 f"confidence column {cc!r} is numeric")
            _confidence(frame[cc], levels)  # validates labels and levels
            keep = frame[cc].astype(str).str.strip().str.upper().isin(
                [str(v).upper() for v in levels]).to_numpy()
            out = out.loc[keep].reset_index(drop=True)
            out["confidence"] = _confidence(frame[cc].to_numpy()[keep], None)
        else:
            out["confidence"] = _confidence(frame[cc].to_numpy(), None)
    if sc is None:
        out["sign"] = 0
    else:
        sg = pd.to_numeric(frame[sc], errors="coerce").to_numpy()
        if levels is not None and cc is not None:
            sg = sg[keep]
        bad = ~np.isin(sg, (-1, 0, 1))
        if bad.any():
            raise ValueError(f"sign values must be -1, 0 or +1; got "
                             f"{pd.unique(sg[bad])[:5].tolist()} in column {sc!r}")
        out["sign"] = sg.astype(int)
    out["source"] = name
    return _finish(out, (name,))


def _from_mask(frame, name):
    vals = frame.to_numpy()
    if vals.dtype == bool:
        vals = vals.astype(float)
    try:
        vals = vals.astype(float)
    except (TypeError, ValueError):
        raise ValueError("a prior mask must be numeric or boolean (regulators x targets); "
                         "an edge table needs a regulator column, one of "
                         f"{list(REGULATOR_COLUMNS)}") from None
    if not np.all(np.isfinite(vals)) or np.any(np.abs(vals) > 1):
        raise ValueError("prior mask entries must be finite with |value| <= 1 "
                         "(confidence; negative = repression)")
    ri, ti = np.nonzero(vals)
    out = pd.DataFrame({"regulator": frame.index.astype(str)[ri],
                        "target": frame.columns.astype(str)[ti],
                        "confidence": np.abs(vals[ri, ti]),
                        "sign": np.where(vals[ri, ti] < 0, -1, 0).astype(int),
                        "source": name})
    return _finish(out, (name,))


def _finish(out, sources):
    out = out.loc[out["regulator"] != out["target"]]
    if out.empty:
        raise ValueError("the prior has no regulator -> target edge (after dropping "
                         "self-edges and unselected levels)")
    agg = out.groupby(["regulator", "target"], sort=True).agg(
        confidence=("confidence", "max"),
        sign=("sign", lambda s: int(s.iloc[0]) if s.nunique() == 1 else 0),
        source=("source", lambda s: "+".join(sorted(set(s)))))
    return GrnPrior(agg.reset_index(), tuple(sources))


def combine_priors(*priors, how="noisy_or"):
    """Merge several prior sources into one :class:`GrnPrior`.

    Parameters
    ----------
    *priors : GrnPrior, DataFrame or path
        Sources (non-GrnPrior arguments go through :func:`read_prior`).
    how : {"noisy_or", "max", "mean"}
        Confidence of an edge given by several sources: ``1 - prod(1 - c_s)`` (independent
        evidence; default), the maximum, or the mean over the sources that list it.
        Signs that disagree become 0 (unknown).

    Returns
    -------
    GrnPrior

    Raises
    ------
    ValueError
        No sources, or an unknown ``how`` (the message lists :data:`COMBINE`).
    """
    if how not in COMBINE:
        raise ValueError(f"unknown how {how!r}; allowed: {', '.join(COMBINE)}")
    if not priors:
        raise ValueError("combine_priors needs at least one prior source")
    ps = [p if isinstance(p, GrnPrior) else read_prior(p) for p in priors]
    frames = []
    for i, p in enumerate(ps):
        f = p.edges.copy()
        f["_src"] = i
        frames.append(f)
    allf = pd.concat(frames, ignore_index=True)

    def conf(c):
        c = np.asarray(c, float)
        if how == "noisy_or":
            return float(1.0 - np.prod(1.0 - c))
        return float(c.max() if how == "max" else c.mean())

    agg = allf.groupby(["regulator", "target"], sort=True).agg(
        confidence=("confidence", conf),
        sign=("sign", lambda s: int(s.iloc[0]) if s.nunique() == 1 else 0),
        source=("source", lambda s: "+".join(sorted(set("+".join(s).split("+"))))))
    sources = tuple(s for p in ps for s in p.sources)
    return GrnPrior(agg.reset_index(), sources)


def as_prior(prior):
    """``None``, a :class:`GrnPrior`, a table/path or a list of them -> GrnPrior or None."""
    if prior is None or isinstance(prior, GrnPrior):
        return prior
    if isinstance(prior, (list, tuple)):
        return combine_priors(*prior)
    return read_prior(prior)
