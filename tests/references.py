"""Loop references of the losses, written straight from the papers' formulas (float64).

Shared by the loss tests and the method contract tests, so that a method's loss terms are
checked against code that shares nothing with the library's.
"""

from __future__ import annotations

import math

import torch


def sup_con_loop(z: torch.Tensor, labels: list[int], tau: float) -> torch.Tensor:
    terms = []
    n = len(labels)
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        log_den = torch.logsumexp(torch.stack([z[i] @ z[a] / tau for a in range(n) if a != i]), 0)
        terms.append(-sum(z[i] @ z[p] / tau - log_den for p in positives) / len(positives))
    return torch.stack(terms).mean()


def psc_loop(z: torch.Tensor, labels: list[int], protos: torch.Tensor, tau: float) -> torch.Tensor:
    terms = []
    for i, y in enumerate(labels):
        neg = torch.stack([z[i] @ protos[j] / tau for j in range(len(protos)) if j != y])
        terms.append(-(z[i] @ protos[y] / tau - torch.logsumexp(neg, 0)))
    return torch.stack(terms).mean()


def mpsc_loop(z: torch.Tensor, labels: list[int], protos: torch.Tensor, tau: float):
    n_classes, per_class, _ = protos.shape
    terms = []
    for i, y in enumerate(labels):
        negatives = [(j, m) for j in range(n_classes) if j != y for m in range(per_class)]
        neg = torch.stack([z[i] @ protos[j, m] / tau for j, m in negatives])
        log_den = torch.logsumexp(neg, 0)
        pos = torch.stack([z[i] @ protos[y, m] / tau for m in range(per_class)])
        weights = torch.softmax(pos.detach(), 0)
        terms.append(-sum(weights[m] * (pos[m] - log_den) for m in range(per_class)))
    return torch.stack(terms).mean()


def bcl_loop(
    z: torch.Tensor, labels: list[int], centres: torch.Tensor, tau: float, mean: bool = True
) -> torch.Tensor:
    """BCL (Zhu et al. 2022): targets are the views and the class centres; each class adds
    the mean of its exponentials to the denominator; positives are the anchor's classmates."""
    targets = [z[j] for j in range(len(labels))] + [centres[c] for c in range(len(centres))]
    target_labels = list(labels) + list(range(len(centres)))
    terms = []
    for i, y in enumerate(labels):
        members = {c: [j for j, t in enumerate(target_labels) if t == c and j != i]
                   for c in range(len(centres))}  # fmt: skip
        den = sum(
            sum(torch.exp(z[i] @ targets[j] / tau) for j in js) / len(js) for js in members.values()
        )
        pos = members[y]
        terms.append(-sum(z[i] @ targets[p] / tau - torch.log(den) for p in pos) / len(pos))
    return torch.stack(terms).mean() if mean else torch.stack(terms)


def dscl_loop(q, k, labels, queue, queue_labels, alpha, tau):
    """DSCL (Xuan & Zhang 2024), anchor by anchor: the own key weighs alpha, the other
    same-class entries share 1 - alpha; empty queue slots (label -1) are left out."""
    b = len(labels)
    terms = []
    for i in range(b):
        entries = [(q[j], labels[j], "q") for j in range(b) if j != i]
        entries += [(k[j], labels[j], "own" if j == i else "k") for j in range(b)]
        entries += [(queue[m], queue_labels[m], "Q") for m in range(len(queue_labels))
                    if queue_labels[m] != -1]  # fmt: skip
        s = torch.stack([q[i] @ t / tau for t, _, _ in entries])
        log_p = s - torch.logsumexp(s, 0)
        own = next(n for n, (_, _, kind) in enumerate(entries) if kind == "own")
        others = [n for n, (_, y, kind) in enumerate(entries) if y == labels[i] and kind != "own"]
        if not others:
            terms.append(-log_p[own])
        else:
            share = sum(log_p[n] for n in others) / len(others)
            terms.append(-(alpha * log_p[own] + (1 - alpha) * share))
    return torch.stack(terms).mean()


def pbsd_loop(student, teacher, keys, queue, queue_labels, tau):
    """PBSD: each patch's softmax over [own key, filled queue slots], student vs teacher."""
    filled = [queue[m] for m in range(len(queue_labels)) if queue_labels[m] != -1]
    terms = []
    for i in range(student.shape[0]):
        for j in range(student.shape[1]):

            def dist(x, i=i):
                return torch.stack([x @ keys[i]] + [x @ t for t in filled]) / tau

            p_t = torch.softmax(dist(teacher[i, j].detach()), 0)
            terms.append(-(p_t * torch.log_softmax(dist(student[i, j]), 0)).sum())
    return torch.stack(terms).mean()


def paco_loop(z, centre_logits, labels, bank, bank_labels, alpha, tau):
    """PaCo (Cui et al. 2021), anchor by anchor: targets are the centres (logits given) and
    the other anchors and filled bank slots (dot / tau); the own centre weighs 1 and each
    same-class sample alpha, normalised by the weights' sum."""
    n = len(labels)
    samples = [(z[j], labels[j]) for j in range(n)]
    samples += [(bank[m], bank_labels[m]) for m in range(len(bank_labels)) if bank_labels[m] != -1]
    terms = []
    for i in range(n):
        entries = [(centre_logits[i, c], "centre", c) for c in range(centre_logits.shape[1])]
        entries += [(z[i] @ t / tau, "sample", y) for j, (t, y) in enumerate(samples) if j != i]
        log_d = torch.logsumexp(torch.stack([s for s, _, _ in entries]), 0)
        num, weight = 0.0, 0.0
        for s, kind, y in entries:
            if y != labels[i]:
                continue
            w = 1.0 if kind == "centre" else alpha
            num, weight = num + w * (s - log_d), weight + w
        terms.append(-num / weight)
    return torch.stack(terms).mean()


def log_iv_mp(nu: float, x: float) -> float:
    """log I_nu(x) with mpmath at 40 digits (shares nothing with the library)."""
    import mpmath

    with mpmath.workdps(40):
        return float(mpmath.log(mpmath.besseli(nu, x)))


def proco_loop(z, labels, mu, kappa, log_prior, tau):
    """ProCo (Du et al. 2024), anchor by anchor and class by class: the logit of class j is
    log C_p(kappa_j) - log C_p(|kappa_j mu_j + z / tau|), log C_p(k) = nu log k - log I_nu(k);
    cross-entropy with the log prior added. Bessel values from mpmath: a constant of the
    graph, so only the value (not the gradient) is a reference."""
    p = z.shape[1]
    nu = p / 2 - 1
    terms = []
    for i, y in enumerate(labels):
        logits = []
        for j in range(len(kappa)):
            k = float(kappa[j])
            tilde = float(torch.linalg.vector_norm(k * mu[j] + z[i].detach() / tau))
            log_c = nu * math.log(k) - log_iv_mp(nu, k)
            log_c_tilde = nu * math.log(tilde) - log_iv_mp(nu, tilde)
            logits.append(log_c - log_c_tilde + float(log_prior[j]))
        row = torch.tensor(logits, dtype=torch.float64)
        terms.append(-(row[y] - torch.logsumexp(row, 0)))
    return torch.stack(terms).mean()
