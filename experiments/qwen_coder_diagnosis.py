#!/usr/bin/env python
"""Why GPTQ lost to round-to-nearest on Qwen2.5-Coder-1.5B with 16 x 512 calibration tokens (issue 15).

Three measurements, each printing one JSON line per case (reports/qwen2.5-coder-1.5b-domains/DIAGNOSIS.md
quotes them):

    python experiments/qwen_coder_diagnosis.py splice RTN_CKPT GPTQ_CKPT [--windows 8] [--corpora wiki,wiki-fr]
        end to end: the fp model with every quantized linear taken from one checkpoint or the other, by
        rule (all RTN, all GPTQ, GPTQ except the four down_proj layers with outlier inputs, ...), and the
        mean NLL of the first eval windows of each corpus (the study's own windows), the fp model's first.
    python experiments/qwen_coder_diagnosis.py attribute RTN_CKPT GPTQ_CKPT [--windows 8]
        where the loss lives: the fp model with one class of linears (q/k/v, o, gate/up, down_proj, the four
        outlier down_proj, all) from one checkpoint, every other linear fp; the same windows' mean NLL.
    python experiments/qwen_coder_diagnosis.py tokens LAYER [--damps 0.01,0.1,0.3,0.9]
        one layer: down_proj of LAYER quantized by RTN and by GPTQ (calibration: the 16 x 512 English+Chinese
        samples of the study's rows) at several dampings; the relative output error on held-out wiki tokens
        (windows 16-23, which the study never scored), the attention-sink token (position 0) apart from the rest.
    python experiments/qwen_coder_diagnosis.py proxy LAYERS [--variants defaults,shrink0.5,lw] [--classes qkv,gateup]
        one layer, every linear class (q/k/v, o, gate/up, down): GPTQ calibrated on the defaults' 16 x 512
        calibration (the fp model's inputs) in several variants, and each variant's output error on every held-out
        domain's own Hessian (the last 8 windows of 512 of each domain's eval text) over RTN's; with the
        calibration's Ledoit-Wolf shrinkage intensity (HessianAccumulator.shrinkage) per class.
    python experiments/qwen_coder_diagnosis.py awq LAYERS [--classes qkv,gateup,down] [--windows 4]
        one layer: the channel scales --awq-scales searches on the 16 x 512 calibration, and their effect on
        round-to-nearest's output error on every held-out domain, with and without the attention-sink token.
    python experiments/qwen_coder_diagnosis.py spectrum LAYERS [--classes qkv,o,gateup] [--damps 0.01,0.047,0.19,0.75]
        one layer: the calibration Hessian's eigen-directions that a damping of D x its mean diagonal overrides
        (eigenvalue below the damping): their share of the directions, of the calibration's energy, and of each
        held-out domain's energy in the same directions (where GPTQ's compensation puts error the damping does not
        stop, it reaches held-out text in proportion to that share).
    python experiments/qwen_coder_diagnosis.py groups LAYERS [--classes qkv,o,gateup]
        one layer: act-order GPTQ with static groups (scales fixed up front from the original weights) against groups
        set as GPTQ reaches them, at the defaults otherwise: output error over RTN's on the calibration and on every
        held-out domain (as `proxy`), and the share of codes at the grid's ends (each group's extreme weights, and
        any that GPTQ's updates pushed past a static group's range).

The fp model runs in bfloat16 and one torch thread; quantization math is qwen_quant.quantize.gptq itself.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # offline_qwen, beside this script
from offline_qwen import fp_folder, study_dir  # noqa: E402

SEQLEN = 512
OUTLIER_DOWN = r"layers\.(1|2|26|27)\.mlp\.down_proj"  # down_proj inputs with massive activations on this model
# the down_proj layers --rtn-massive 3.0 picks on this model (a calibration sample's peak token norm over its median:
# 15.0, 6.9, 6.2, 10.7, 3.5 on the 16 x 512 calibration; every other linear 2.6 or less)
MASSIVE_DOWN = r"layers\.(1|2|3|26|27)\.mlp\.down_proj"
SPLICES = {  # name -> which linears take the GPTQ checkpoint's weights (the rest: RTN's)
    "all rtn": lambda n: False,
    "all gptq": lambda n: True,
    "gptq except down_proj 1,2,26,27": lambda n: not re.search(OUTLIER_DOWN, n),
    "rtn except down_proj 1,2,26,27": lambda n: bool(re.search(OUTLIER_DOWN, n)),
    "gptq except down_proj 1,2,3,26,27": lambda n: not re.search(MASSIVE_DOWN, n),
}


def fp_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = fp_folder()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval(), AutoTokenizer.from_pretrained(folder)


def eval_windows(tok, first: int, count: int, corpus: str = "wiki") -> torch.Tensor:
    from qwen_quant import corpora

    ids = tok("\n\n".join(corpora.corpus_by_name(corpus, "eval").texts))["input_ids"]
    return torch.tensor(ids[first * SEQLEN:(first + count) * SEQLEN]).view(count, SEQLEN)


def dequantized(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from qwen_quant.kernels.format import dequantize

    t = load_file(str(Path(folder) / "model.safetensors"))
    return {k[:-8]: dequantize(t[k], t[k[:-8] + ".qzeros"], t[k[:-8] + ".scales"], t[k[:-8] + ".g_idx"], 4,
                               dtype=torch.bfloat16) for k in t if k.endswith(".qweight")}


def print_case(case: str, model, win: torch.Tensor, **extra) -> None:
    """One JSON line: the model's mean NLL over the windows, and each window's."""
    nll = [float(torch.nn.functional.cross_entropy(model(input_ids=w[None]).logits[0, :-1].float(), w[1:]))
           for w in win]
    print(json.dumps({"case": case, **extra, "windows": len(win), "mean_nll": round(sum(nll) / len(nll), 5),
                      "nll": [round(x, 5) for x in nll]}), flush=True)


@torch.no_grad()
def splice(rtn: str, gptq_ckpt: str, windows: int, cases: list[str] | None = None,
           corpora: tuple[str, ...] = ("wiki",)) -> None:
    model, tok = fp_model()
    wins = {c: eval_windows(tok, 0, windows, c) for c in corpora}
    for c, win in wins.items():  # the reference the cases' losses are measured from
        print_case("fp", model, win, corpus=c)
    a, b = dequantized(rtn), dequantized(gptq_ckpt)
    for name, from_gptq in SPLICES.items():
        if cases and name not in cases:
            continue
        for p in a:
            model.get_submodule(p).weight.data.copy_(b[p] if from_gptq(p) else a[p])
        for c, win in wins.items():
            print_case(name, model, win, corpus=c)


CLASSES = {  # name -> which linears a case quantizes (the others keep their fp weights)
    "q/k/v": r"self_attn\.[qkv]_proj",
    "o_proj": r"self_attn\.o_proj",
    "gate/up": r"mlp\.(gate|up)_proj",
    "down_proj": r"mlp\.down_proj",
    "down_proj 1,2,26,27": OUTLIER_DOWN,
    "every linear": r".",
}


@torch.no_grad()
def attribute(rtn: str, gptq_ckpt: str, windows: int) -> None:
    """Where the quantized model's loss lives: the fp model with only one class of linears (CLASSES) taken from
    the RTN or the GPTQ checkpoint, the rest fp; the mean NLL of the first wiki eval windows. A class whose RTN
    case costs much and whose GPTQ case costs as much is where GPTQ's edge is missing."""
    model, tok = fp_model()
    win = eval_windows(tok, 0, windows)
    a, b = dequantized(rtn), dequantized(gptq_ckpt)
    fp = {p: model.get_submodule(p).weight.detach().clone() for p in a}
    cases = [("fp", None, None)] + [(f"{src} only in {cls}", src, rule) for cls, rule in CLASSES.items()
                                    for src in ("rtn", "gptq")]
    for case, src, rule in cases:
        for p in a:
            take = src is not None and re.search(rule, p)
            model.get_submodule(p).weight.data.copy_((a if src == "rtn" else b)[p] if take else fp[p])
        print_case(case, model, win)


def layer_inputs(model, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """down_proj's inputs [samples, tokens, K] (the forward stops there)."""
    return class_inputs(model, layer, ids)["down"]


def tokens(layer: int, damps: list[float]) -> None:
    from qwen_quant.quantize import gptq
    from qwen_quant.quantize.calibration import build_calibration

    model, tok = fp_model()
    calib = build_calibration(tok, "wiki+peoples-daily", nsamples=16, seqlen=SEQLEN, seed=0).input_ids
    cache = study_dir() / "diagnosis" / f"down_proj-{layer}-inputs.pt"
    if cache.is_file():
        xc, xe = torch.load(cache)
    else:
        xc, xe = layer_inputs(model, layer, calib), layer_inputs(model, layer, eval_windows(tok, 16, 8))
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save((xc, xe), cache)
    w = model.model.layers[layer].mlp.down_proj.weight.detach().float()
    rows = xc.reshape(-1, xc.shape[-1])
    h = 2 * rows.T @ rows / rows.shape[0]

    def report(case: str, q: torch.Tensor) -> None:
        d = w - q
        rel = (xe @ d.T).norm(dim=-1) ** 2 / (xe @ w.T).norm(dim=-1) ** 2  # [samples, tokens]
        calib_rel = float((xc @ d.T).norm() ** 2 / (xc @ w.T).norm() ** 2)
        print(json.dumps({"layer": layer, "case": case, "calibration_rel_error": round(calib_rel, 5),
                          "heldout_sink_rel_error": round(float(rel[:, 0].mean()), 5),
                          "heldout_rest_rel_error": round(float(rel[:, 1:].mean()), 5)}), flush=True)

    report("rtn", gptq.rtn_quantize(w, 4, 128, True).weight)
    for damp in damps:
        report(f"gptq damp {damp}", gptq.gptq_quantize(w, h, 4, 128, True, damp=damp).weight)
        report(f"gptq act-order+static+mse damp {damp}",
               gptq.gptq_quantize(w, h, 4, 128, True, damp=damp, desc_act=True, static_groups=True, mse=True).weight)


# linear class -> (the module whose input is the class's input, the linears that share it)
INPUT_CLASSES = {"qkv": ("self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                 "o": ("self_attn.o_proj", ("self_attn.o_proj",)),
                 "gateup": ("mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj")),
                 "down": ("mlp.down_proj", ("mlp.down_proj",))}
HELDOUT = {"wiki": "wiki", "zh": "peoples-daily", "code": "humaneval-code", "fr": "wiki-fr", "fiction": "fiction"}
# variant -> (damping: "auto" = the defaults' --damp-auto rule, or a fixed fraction; shrink: a number or "lw")
VARIANTS = {"defaults": ("auto", 0.0), "shrink0.5": ("auto", 0.5), "shrink0.5-d.01": (0.01, 0.5),
            "lw": ("auto", "lw"), "lw-d.01": (0.01, "lw"), "shrink0.8": ("auto", 0.8)}


def last_windows(tok, corpus: str, count: int) -> torch.Tensor:
    """The last `count` windows of a domain's eval text (the study scores its first 16, the accuracy table 32)."""
    from qwen_quant import corpora

    ids = tok("\n\n".join(corpora.corpus_by_name(corpus, "eval").texts))["input_ids"]
    return torch.tensor(ids[len(ids) - count * SEQLEN:]).view(count, SEQLEN)


def study_ids(tok, windows: int = 8) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The layer-by-layer diagnoses' token ids: the defaults' 16 x 512 calibration (seed 0), and the last `windows`
    windows of 512 of each held-out domain's eval text."""
    from qwen_quant.quantize.calibration import build_calibration

    calib = build_calibration(tok, "default", nsamples=16, seqlen=SEQLEN, seed=0).input_ids
    return calib, {d: last_windows(tok, c, windows) for d, c in HELDOUT.items()}


@torch.no_grad()
def class_inputs(model, layer: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every linear class's inputs in LAYER [samples, tokens, K], one forward per row stopped after down_proj."""
    grabbed = {c: [] for c in INPUT_CLASSES}

    class Stop(Exception):
        pass

    def hook_for(cls):
        def hook(_m, a):
            grabbed[cls].append(a[0][0].float().clone())
            if cls == "down":
                raise Stop
        return hook

    block = model.model.layers[layer]
    handles = [block.get_submodule(path).register_forward_pre_hook(hook_for(c)) for c, (path, _) in INPUT_CLASSES.items()]
    try:
        for row in ids:
            try:
                model(input_ids=row[None])
            except Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {c: torch.stack(v) for c, v in grabbed.items()}


def held_hessians(held: dict[str, dict[str, torch.Tensor]], cls: str) -> dict[str, torch.Tensor]:
    """Each held-out domain's Hessian (2 X^T X / tokens, as HessianAccumulator's) of one linear class's inputs."""
    out = {}
    for d in HELDOUT:
        x = held[d][cls].reshape(-1, held[d][cls].shape[-1])
        out[d] = 2 * x.T @ x / x.shape[0]
    return out


def proxy(layers: list[int], variants: list[str], classes: list[str]) -> None:

    model, tok = fp_model()
    calib_ids, held_ids = study_ids(tok)
    for layer in layers:
        proxy_layer(model, layer, class_inputs(model, layer, calib_ids),
                    {d: class_inputs(model, layer, ids) for d, ids in held_ids.items()}, variants, classes)


def proxy_layer(model, layer, calib, held, variants, classes) -> None:
    from qwen_quant.quantize import gptq
    from qwen_quant.quantize.settings import QuantSettings

    settings = QuantSettings()
    block = model.model.layers[layer]
    for cls in classes:
        names = INPUT_CLASSES[cls][1]
        w = torch.cat([block.get_submodule(n).weight.detach().float() for n in names])
        acc = gptq.HessianAccumulator(w.shape[1], spread=True)
        for sample in calib[cls]:
            acc.add_batch(sample)
        h, lw = acc.hessian(), acc.shrinkage()
        held_h = held_hessians(held, cls)

        def errors(q):
            return {d: float(((w - q) @ hd * (w - q)).sum()) for d, hd in held_h.items()}

        rtn = errors(gptq.rtn_quantize(w, 4, 128, True).weight)
        for name in variants:
            damp, shrink = VARIANTS[name]
            damp = settings.damp_for(w.shape[1], acc.tokens) if damp == "auto" else damp
            shrink = lw if shrink == "lw" else shrink
            # mse=True: the range search was a default when DIAGNOSIS.md section 5 was measured with this
            q = gptq.gptq_quantize(w, h, 4, 128, True, desc_act=True, static_groups=True, damp=damp, mse=True,
                                   shrink=shrink).weight
            ratio = {d: round(e / rtn[d], 3) for d, e in errors(q).items()}
            print(json.dumps({"layer": layer, "class": cls, "variant": name, "damp": round(damp, 4),
                              "shrink": round(shrink, 4), "lw": round(lw, 4), "ratio_to_rtn": ratio}), flush=True)


def spectrum(layers: list[int], classes: list[str], damps: list[float]) -> None:
    from qwen_quant.quantize import gptq

    model, tok = fp_model()
    calib_ids, held_ids = study_ids(tok)
    for layer in layers:
        calib = class_inputs(model, layer, calib_ids)
        held = {d: class_inputs(model, layer, ids) for d, ids in held_ids.items()}
        for cls in classes:
            acc = gptq.HessianAccumulator(calib[cls].shape[-1])
            for sample in calib[cls]:
                acc.add_batch(sample)
            h = acc.hessian()
            line = {"layer": layer, "class": cls, "tokens": acc.tokens,
                    **energy_below(h, {d: held[d][cls] for d in HELDOUT}, damps)}
            print(json.dumps(line), flush=True)


def energy_below(h: torch.Tensor, held: dict[str, torch.Tensor], damps: list[float]) -> dict:
    """H's eigen-directions that a damping of D x mean(diag H) overrides (eigenvalue below it), for each D: their
    share of the directions, of H's energy (trace), and of each held-out text's energy (its inputs [..., K]
    projected on H's eigen-basis, as a share of its own trace)."""
    h = h.double()
    diag = h.diagonal()
    mean = diag.mean()
    eigval, eigvec = torch.linalg.eigh(h)
    held_energy = {}
    for d, x in held.items():
        e = (x.reshape(-1, x.shape[-1]).double() @ eigvec).square().sum(0)
        held_energy[d] = e / e.sum()
    out = {"diag_max_over_mean": round(float(diag.max() / mean), 1),
           "diag_median_over_mean": round(float(diag.median() / mean), 3),
           "top_eigenvalue_share": round(float(eigval[-1] / eigval.sum()), 3), "damps": {}}
    for damp in damps:
        below = eigval < damp * mean
        out["damps"][str(damp)] = {
            "directions": round(float(below.double().mean()), 3),
            "calibration_energy": round(float(eigval[below].sum() / eigval.sum()), 4),
            "held_out_energy": {d: round(float(e[below].sum()), 4) for d, e in held_energy.items()}}
    return out


def groups(layers: list[int], classes: list[str]) -> None:
    from qwen_quant.quantize import gptq
    from qwen_quant.quantize.settings import QuantSettings

    settings = QuantSettings()
    model, tok = fp_model()
    calib_ids, held_ids = study_ids(tok)
    for layer in layers:
        calib = class_inputs(model, layer, calib_ids)
        held = {d: class_inputs(model, layer, ids) for d, ids in held_ids.items()}
        block = model.model.layers[layer]
        for cls in classes:
            w = torch.cat([block.get_submodule(n).weight.detach().float() for n in INPUT_CLASSES[cls][1]])
            acc = gptq.HessianAccumulator(w.shape[1])
            for sample in calib[cls]:
                acc.add_batch(sample)
            h = acc.hessian()
            hessians = {"calibration": h} | held_hessians(held, cls)

            def errors(q):
                return {d: float(((w - q) @ hd * (w - q)).sum()) for d, hd in hessians.items()}

            def at_ends(result):
                return round(float(((result.codes == 0) | (result.codes == 15)).float().mean()), 5)

            rtn = gptq.rtn_quantize(w, 4, 128, True)
            base = errors(rtn.weight)
            line = {"layer": layer, "class": cls, "damp": round(settings.damp_for(w.shape[1], acc.tokens), 4),
                    "codes_at_ends": {"rtn": at_ends(rtn)}, "ratio_to_rtn": {}}
            # act-order's groups: fixed up front (the default), set as GPTQ reaches 128 consecutive columns of its
            # order (--no-static-groups), or the original groups in order of their peak (--act-group-aware)
            for name, static, aware in (("static", True, False), ("dynamic", False, False),
                                        ("group_aware", False, True)):
                q = gptq.gptq_quantize(w, h, 4, 128, True, desc_act=True, static_groups=static, group_aware=aware,
                                       damp=settings.damp_for(w.shape[1], acc.tokens))
                line["codes_at_ends"][name] = at_ends(q)
                line["ratio_to_rtn"][name] = {d: round(e / base[d], 3) for d, e in errors(q.weight).items()}
                if static:  # --refit-scales on the defaults' codes: least-squares scales on the calibration
                    refit = gptq.refit_scales(w, h, q)
                    line["ratio_to_rtn"]["static_refit"] = {d: round(e / base[d], 3)
                                                            for d, e in errors(refit.weight).items()}
                    change = (refit.scales / q.scales).flatten()
                    line["refit_scale_change"] = {"median": round(float(change.median()), 4),
                                                  "share_lower": round(float((change < 1).float().mean()), 4),
                                                  "p05": round(float(change.quantile(0.05)), 4),
                                                  "p95": round(float(change.quantile(0.95)), 4)}
            print(json.dumps(line), flush=True)


def awq(layers: list[int], classes: list[str], windows: int) -> None:
    """--awq-scales layer by layer: the scales the pipeline's search picks on the defaults' 16 x 512 calibration (the
    fp model's inputs), and what they do to round-to-nearest's output error on each held-out domain (the last
    `windows` windows of its eval text), over the error without them; once on every token and once without each
    window's first token (the attention sink, where massive activations live). Variant "sinkless": the same
    search with the calibration's first tokens left out of its objective."""
    from qwen_quant.quantize import equalize, gptq

    model, tok = fp_model()
    calib_ids, held_ids = study_ids(tok, windows)
    for layer in layers:
        calib = class_inputs(model, layer, calib_ids)
        held = {d: class_inputs(model, layer, ids) for d, ids in held_ids.items()}
        block = model.model.layers[layer]
        for cls in classes:
            ws = [block.get_submodule(n).weight.detach().float() for n in INPUT_CLASSES[cls][1]]
            w = torch.cat(ws)
            held_h = {}
            for d in HELDOUT:
                x = held[d][cls]
                for part, tokens in (("all", x), ("sinkless", x[:, 1:])):
                    rows = tokens.reshape(-1, x.shape[-1])
                    held_h[d, part] = 2 * rows.T @ rows / rows.shape[0]
            for variant, xc in (("awq", calib[cls]), ("sinkless", calib[cls][:, 1:])):
                acc = gptq.HessianAccumulator(w.shape[1])
                for sample in xc:
                    acc.add_batch(sample)
                s, alpha, calib_ratio = equalize.search_scales(ws, acc.hessian(), acc.mean_abs(), 4, 128, True)
                ratio = {}
                for (d, part), hd in held_h.items():
                    with_s, without = (float(equalize.output_error(w, hd, sc, 4, 128, True).sum())
                                       for sc in (s, torch.ones_like(s)))
                    ratio[f"{d} {part}"] = round(with_s / without, 3)
                print(json.dumps({"layer": layer, "class": cls, "variant": variant, "alpha": alpha,
                                  "calibration_ratio": round(calib_ratio, 3), "heldout_ratio": ratio}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("splice")
    s.add_argument("rtn")
    s.add_argument("gptq")
    s.add_argument("--windows", type=int, default=8)
    s.add_argument("--cases", default="", help=f"';'-joined names among: {'; '.join(SPLICES)} (default all)")
    s.add_argument("--corpora", default="wiki", help="','-joined eval corpora (qwen_quant.corpora names: wiki, "
                                                      "wiki-fr, fiction, ...; default wiki)")
    a = sub.add_parser("attribute")
    a.add_argument("rtn")
    a.add_argument("gptq")
    a.add_argument("--windows", type=int, default=8)
    t = sub.add_parser("tokens")
    t.add_argument("layer", type=int)
    t.add_argument("--damps", default="0.01,0.1,0.3,0.9")
    x = sub.add_parser("proxy")
    x.add_argument("layers", help="','-joined layer numbers, e.g. 1,14,27")
    x.add_argument("--variants", default=",".join(VARIANTS), help=f"','-joined among: {', '.join(VARIANTS)}")
    x.add_argument("--classes", default=",".join(INPUT_CLASSES), help=f"','-joined among: {', '.join(INPUT_CLASSES)}")
    w = sub.add_parser("awq")
    w.add_argument("layers", help="','-joined layer numbers, e.g. 1,2,14")
    w.add_argument("--classes", default="qkv,gateup,down", help="','-joined among: qkv, gateup, down")
    w.add_argument("--windows", type=int, default=4, help="held-out windows per domain (default 4)")
    e = sub.add_parser("spectrum")
    e.add_argument("layers", help="','-joined layer numbers, e.g. 2,14,24")
    e.add_argument("--classes", default="qkv,o,gateup", help=f"','-joined among: {', '.join(INPUT_CLASSES)}")
    e.add_argument("--damps", default="0.01,0.047,0.19,0.75",
                   help="','-joined dampings as fractions of the mean Hessian diagonal (default: what --damp-auto "
                        "0.03125, 0.5, 2 and 8 give a 1536-input layer at 32 x 512 tokens; 0.01 is the floor)")
    g = sub.add_parser("groups", help="act-order's groups fixed up front, set as GPTQ reaches them, or whole groups "
                                      "in order (--act-group-aware), and --refit-scales on the first: each layer "
                                      "class's output error over RTN's on the calibration and on held-out text")
    g.add_argument("layers", help="','-joined layer numbers, e.g. 2,14,24")
    g.add_argument("--classes", default="qkv,o,gateup", help=f"','-joined among: {', '.join(INPUT_CLASSES)}")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.step == "splice":
        splice(args.rtn, args.gptq, args.windows, [c for c in args.cases.split(';') if c],
               tuple(args.corpora.split(",")))
    elif args.step == "attribute":
        attribute(args.rtn, args.gptq, args.windows)
    elif args.step == "awq":
        awq([int(v) for v in args.layers.split(",")], args.classes.split(","), args.windows)
    elif args.step == "groups":
        groups([int(v) for v in args.layers.split(",")], args.classes.split(","))
    elif args.step == "spectrum":
        spectrum([int(v) for v in args.layers.split(",")], args.classes.split(","),
                 [float(v) for v in args.damps.split(",")])
    elif args.step == "proxy":
        proxy([int(v) for v in args.layers.split(",")], args.variants.split(","), args.classes.split(","))
    else:
        tokens(args.layer, [float(x) for x in args.damps.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
