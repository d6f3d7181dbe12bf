"""Every setting of a quantization run in one place: its default and the evidence for it, its check, and its
command-line option. `QuantSettings` validates itself when made (one-line UserErrors, before anything is
loaded); qwen-quantize's options are built from its fields (`add_arguments` / `from_args`), so a new
setting is one field here.
"""

from __future__ import annotations

import argparse
import dataclasses

from qwen_quant.errors import UserError
from qwen_quant.kernels.format import SUPPORTED_BITS

METHODS = ("gptq", "rtn")
MAX_DAMP = 0.95  # gptq_quantize takes damp in (0, 1)
FORWARD_DTYPES = ("auto", "bf16", "model")


def _opt(default, help: str, group: str = "quantization", flag: str | None = None, **argparse_kw):
    """A field with its CLI option: `flag` (default --field-name), `help`, and any add_argument keywords."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, "flag": flag, **argparse_kw})


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    bits: int = _opt(4, "bits per weight: 2, 3, 4 or 8 (default 4)")
    group_size: int = _opt(128, "weights per scale along the input: 128 (default; 4.16 bits per weight with the fp16 "
                                "scales and packed zeros), 64 or 32 (4.31 / 4.63 bits; smaller groups lose less "
                                "accuracy, reports/demo-accuracy/levers/levers.md), or -1 for one group per row")
    method: str = _opt("gptq", "gptq (default) or rtn (round-to-nearest baseline)")
    # act-order with static groups: columns quantized by decreasing Hessian diagonal, group params fixed up
    # front, so g_idx stays i // group_size and kernels need no permutation
    desc_act: bool = _opt(True, "act-order: quantize input columns by decreasing Hessian diagonal (default on; it is "
                                "the largest accuracy gain on the demo model, reports/quantize-demo-cpu.md)")
    static_groups: bool = _opt(True, "fix each group's scales before the act-order pass (default on): g_idx stays in "
                                     "order, so kernels run without a permutation; --no-static-groups gives classic "
                                     "act-order (a permuted g_idx)")
    # GPTQModel's act_group_aware: act-order by whole groups, so each group's scales can wait until GPTQ reaches
    # it (as --no-static-groups does) while g_idx stays in order (as static groups keep it). On Qwen2.5-Coder-1.5B
    # its layer error is above static groups' in every layer class measured and end to end it cost fiction 0.022
    # nats (reports/qwen2.5-coder-1.5b-domains/DIAGNOSIS.md, section 13): ordering whole groups gives up act-order's
    # own point. Opt-in, for matching a GPTQModel recipe.
    act_group_aware: bool = _opt(False, "act-order by whole groups (GPTQModel's act_group_aware): groups of inputs in "
                                        "order of their largest Hessian diagonal, inputs within a group by decreasing "
                                        "diagonal; each group's scales set from its weights as GPTQ has updated them "
                                        "when it reaches the group (so --static-groups does not apply), g_idx in order "
                                        "(default off: on Qwen2.5-Coder-1.5B worse than static groups)")
    sym: bool = _opt(True, "asymmetric zero points (default symmetric, as Qwen's Int4 release)", flag="--asym",
                     inverse=True)
    damp: float = _opt(0.01, "dampening as a fraction of the mean Hessian diagonal, in (0, 1) (default 0.01, Qwen's "
                             "Int4 release): the floor under --damp-auto")
    # Thin calibration overfits: with fewer calibration tokens than a layer has inputs (16 x 512 tokens against
    # down_proj's 8960 on Qwen2.5-Coder-1.5B) the Hessian is rank-deficient and GPTQ's error compensation, exact
    # on the calibration tokens, raised held-out error above RTN's on the down_proj layers with outlier
    # activations (layer 1: 1.8x RTN's at damp 0.01, 0.70x at 0.9; reports/qwen2.5-coder-1.5b-domains/). The
    # damping grows with inputs/tokens and fades to --damp at full calibration (128 x 2048 tokens).
    damp_auto: float = _opt(0.5, "raise the damping where calibration is thin: each layer uses max(--damp, ALPHA x "
                                 "inputs / calibration tokens), capped below 1 (default 0.5: 0.55 on a 8960-input "
                                 "down_proj with 16 x 512 tokens, 0.017 with 128 x 2048; 0 = always --damp)",
                            metavar="ALPHA")
    # Shrinkage toward the diagonal: damping's sibling. Damping adds one constant to every input's energy;
    # shrinking scales down every correlation between inputs and keeps each input's scale, so outlier channels
    # stay heavy. "auto" takes each layer's Ledoit-Wolf intensity from the spread of its calibration samples'
    # own Hessians (HessianAccumulator.shrinkage): large where calibration is thin or mixed, fading as it grows.
    shrink: float | str = _opt(0.0, "shrink each Hessian toward its diagonal before GPTQ: (1 - S) H + S diag(H) scales "
                                     "every correlation between inputs by 1 - S; auto: each layer's Ledoit-Wolf "
                                     "intensity, from how much its calibration samples disagree (default 0 = classic "
                                     "GPTQ; 1 = no compensation between columns, round-to-nearest under GPTQ's group "
                                     "parameters)", metavar="S|auto", type=str)
    # The range search clips each group's range to the weights' own lowest-error grid, before GPTQ moves them.
    # On the demo model it had cut GPTQ's perplexity loss from 0.997x to 0.880x of RTN's; on Qwen2.5-Coder-1.5B
    # (16 x 512 tokens) it cost held-out perplexity on all five domains: 0.86/0.63/0.75/0.93/1.09 x RTN's loss
    # with it, 0.78/0.59/0.60/0.86/0.85 without (reports/qwen2.5-coder-1.5b-domains/, rows massive3-rtn and nomse).
    # Off, as in GPTQModel (mse=0), AutoGPTQ and Qwen's release.
    mse: bool = _opt(False, "search shrunken ranges per group for the lowest weight error (default off: on "
                            "Qwen2.5-Coder-1.5B it cost held-out perplexity on every domain measured)",
                     negatable=True)  # --no-mse, the spelling of the years it was on, keeps working
    # asymmetric calibration (GPTAQ): 0 = classic GPTQ (each layer matches its own weights on the quantized
    # model's inputs); alpha > 0 aims each layer at the fp model's outputs instead, alpha scaling the
    # correction (1 = exact). Costs an fp copy of the block being quantized and a second activation stream.
    gptaq_alpha: float = _opt(0.0, "asymmetric calibration (GPTAQ, a.k.a. GPTQ v2): fit each layer to the "
                                   "full-precision model's outputs instead of its own output on the already-quantized "
                                   "model's inputs; ALPHA in [0, 1] scales the correction (0 = plain GPTQ, the "
                                   "default; 1 = exact; the GPTAQ authors' code uses 0.25). Costs one fp copy of a "
                                   "block and a second activation stream (+47%% time on Qwen2.5-Coder-1.5B on a CPU)",
                              flag="--gptaq", metavar="ALPHA")
    # after GPTQ picks the codes, move each group's scale to the least-squares optimum of the layer's output
    # error (codes and zero points fixed): `gptq.refit_scales`. GPTQ-only; the format is unchanged. On
    # Qwen2.5-Coder-1.5B (32 x 512, two draws) it lowered every layer class's error by ~1 % held out too, yet end
    # to end no held-out domain gained and fiction lost 0.014 nats (DIAGNOSIS.md, section 13). Opt-in.
    refit_scales: bool = _opt(False, "after GPTQ fixes the codes, refit every group's scale by least squares to the "
                                     "layer's output error on the calibration data (the objective GPTQ minimizes; "
                                     "same format, 1.6x the layers' GPTQ time on Qwen2.5-Coder-1.5B). Never raises "
                                     "a layer's calibration error; most help where inputs have outliers (default off: "
                                     "on Qwen2.5-Coder-1.5B no held-out gain end to end)")
    # AWQ's activation-aware channel scales (quantize/equalize.py), searched per group of linears and folded into
    # the norms and up_proj before GPTQ: one exponent per layer is all the calibration decides. On Qwen2.5-Coder-1.5B
    # (32 x 512) nothing measurable before GPTQ, round-to-nearest worse on English, twice the quantize time; its
    # objective fits the calibration's attention-sink tokens (reports/qwen2.5-coder-1.5b-domains/DIAGNOSIS.md,
    # section 10). Opt-in.
    awq_scales: bool = _opt(False, "fold activation-aware channel scales into the model before quantizing (AWQ's "
                                   "scale search, Lin et al. 2024): each input channel scaled by mean|x|^alpha / "
                                   "w^(1-alpha), alpha searched per layer for the lowest round-to-nearest output error "
                                   "on the calibration data; the norms and up_proj absorb the inverse, the format is "
                                   "unchanged (default off: on Qwen2.5-Coder-1.5B no gain before GPTQ, about twice "
                                   "the quantize time)")
    # Left in, the few attention-sink tokens of a massive-activation layer (Qwen2.5-Coder-1.5B's down_proj in layers
    # 1-3, 26, 27: 3.2-67 x the median token's norm at 32 x 512) rule the search's H-weighted error, and the scales
    # fit them: in the 16 x 512 diagnosis layer 2's down_proj got 88 % less error on the calibration and 31-35 % less
    # held out; searched without them, 46 % and 59-60 % (DIAGNOSIS.md, section 10). The ratio is --rtn-massive's measure, token by token. End to end at 32 x 512 it
    # changed nothing measurable (two draws, every domain within 0.004 nats of --awq-scales alone; section 11).
    awq_drop_massive: float = _opt(0.0, "with --awq-scales: leave out of the scale search the tokens whose input norm "
                                        "is over RATIO x their sample's median token's (the attention-sink tokens of "
                                        "massive-activation layers, which the search otherwise fits; e.g. 3.0, "
                                        "--rtn-massive's ratio). Quantization still sees every token (default 0: the "
                                        "search sees every token)", metavar="RATIO")
    # Massive activations (Sun et al. 2024, "Massive activations in large language models"): in a few layers a
    # few tokens (the attention sink at position 0) reach many times the typical token's input norm. On
    # Qwen2.5-Coder-1.5B: down_proj of layers 1, 2, 3, 26, 27 (peak over median 3.5-15 on the calibration; every
    # other linear 2.6 or less). There GPTQ lost ~3x round-to-nearest's loss end to end even with --damp-auto, and
    # rounding those five to nearest took the 16 x 512 defaults from 0.99/0.67/0.75/1.05/1.18 to
    # 0.86/0.63/0.75/0.93/1.09 x RTN's perplexity loss (English, Chinese, code, French, fiction). It is not universal:
    # on the demo model (SmolLM2) GPTQ beats RTN in its massive layers at every calibration size measured, and the
    # rule cost perplexity once calibration held 5x the inputs (reports/qwen2.5-coder-1.5b-domains/DIAGNOSIS.md,
    # section 4). On Qwen it is not only thin calibration: the rule also paid at 32 x 512 (every domain, 1.3-4.7
    # paired SE), 64 x 512 and at the default 128 x 2048 (a full quantize run: English 2.7, French 4.7 paired SE
    # better, the other three within 1.3 SE; DIAGNOSIS.md, section 6), while waiting for thin calibration
    # (--rtn-massive-thin, the default until 2026-12-06) left the defaults at 32 x 512 worse than RTN out of domain.
    # So it fires at any calibration size; the default follows the real Qwen, and --rtn-massive-thin keeps the demo
    # model's better choice available.
    rtn_massive: float = _opt(3.0, "round to nearest the linears whose inputs carry massive activations: in the "
                                   "median calibration sample, the largest token input norm is more than RATIO x the "
                                   "median token's (default 3.0; ordinary layers 1.1-2.6 on Qwen2.5-Coder-1.5B). There "
                                   "GPTQ's error compensation, fitted to a few huge tokens, generalized worse than "
                                   "RTN at every calibration size measured on that model, 128 x 2048 included. "
                                   "0 = GPTQ everywhere",
                              metavar="RATIO")
    rtn_massive_thin: bool = _opt(False, "--rtn-massive only where the layer has fewer calibration tokens than "
                                         "inputs (a rank-deficient Hessian: down_proj at 16 x 512 tokens). Default "
                                         "off: on Qwen2.5-Coder-1.5B the rule paid at every calibration size; on the "
                                         "demo model (SmolLM2) GPTQ wins in its massive layers once calibration is "
                                         "ample, and this flag keeps it there",
                                  negatable=True)  # --no-rtn-massive-thin keeps working: the rows made while it was on spell it
    # the output head after the blocks (GPTQModel's lm_head=True; vLLM and GPTQModel load it): on Qwen2.5-1.5B the
    # BF16 head is 0.47 GB, as much as a quarter of the Int4 model and of the bytes each decoded token reads
    lm_head: bool = _opt(False, "also quantize the output head (lm_head) with GPTQ on the final norm's outputs (default "
                                "off, as Qwen's Int4 releases: the head stays 16-bit). On Qwen2.5-Coder-1.5B: CPU decode "
                                "3.6x BF16 instead of 2.6x, half BF16's memory, +0.15 to +0.33 perplexity on prose "
                                "(README, Quantize)")
    # dtype of the calibration forwards (not of the checkpoint): "auto" runs an fp32 model's block forwards
    # under bfloat16 autocast (2-3x faster on CPUs with AMX/AVX512-BF16 and on GPUs; GPTQ itself and the
    # Hessians stay float32), a 16-bit model in its own dtype; "model" never autocasts.
    forward_dtype: str = _opt("auto", "dtype of the calibration forwards (not of the checkpoint): auto (default) runs "
                                      "an fp32 model's forwards under bf16 autocast, 2-3x faster, GPTQ itself stays "
                                      "fp32; model: the model's own dtype", choices=FORWARD_DTYPES)
    nsamples: int = _opt(128, "calibration samples (default 128)", group="calibration")
    seqlen: int | None = _opt(None, "tokens per sample (default 2048, capped at the model's context)",
                              group="calibration")
    calib: str = _opt("default", "default (English, Chinese, code, chat and English prose, a fifth each), a package "
                                 "corpus (wiki, peoples-daily, code, chat, prose, wiki-fr, wiki-es) or a '+'-joined mix "
                                 "of them (wiki+code+chat; code*2 gives code two shares), a .txt/.jsonl FILE, "
                                 "hf:<dataset id>[:config][:split], or "
                                 "self (the model samples its own calibration text: no corpus needed, but on "
                                 "Qwen2.5-Coder-1.5B no better than RTN out of domain, where the default mix is)",
                      group="calibration")
    seed: int = _opt(0, "seed for choosing calibration samples (default 0)", group="calibration")

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise UserError(f"unsupported --bits {self.bits}: use {', '.join(map(str, SUPPORTED_BITS))}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or (g != -1 and g <= 0):
            raise UserError(f"--group-size {g} is invalid: use -1 (one group per row) or a positive integer such as 128")
        if self.method not in METHODS:
            raise UserError(f"unknown --method {self.method!r}: use gptq or rtn")
        if isinstance(self.nsamples, bool) or not isinstance(self.nsamples, int) or self.nsamples <= 0:
            raise UserError(f"--nsamples must be a positive integer, got {self.nsamples}")
        if self.seqlen is not None and (isinstance(self.seqlen, bool) or not isinstance(self.seqlen, int)
                                        or self.seqlen <= 0):
            raise UserError(f"--seqlen must be a positive integer, got {self.seqlen}")
        if not (0 < float(self.damp) < 1):
            raise UserError(f"--damp {self.damp} is outside (0, 1): use a small fraction of the mean diagonal, e.g. 0.01")
        if not (0 <= float(self.damp_auto) < 100):
            raise UserError(f"--damp-auto {self.damp_auto} is invalid: use 0 (off) or a small positive factor, e.g. 0.5")
        if self.forward_dtype not in FORWARD_DTYPES:
            raise UserError(f"unknown --forward-dtype {self.forward_dtype!r}: use {', '.join(FORWARD_DTYPES)}")
        object.__setattr__(self, "shrink", _shrink_value(self.shrink))
        if not (0 <= float(self.rtn_massive) < 1e6):
            raise UserError(f"--rtn-massive {self.rtn_massive} is invalid: use 0 (off) or a ratio such as 3.0")
        if not (0 <= float(self.awq_drop_massive) < 1e6):
            raise UserError(f"--awq-drop-massive {self.awq_drop_massive} is invalid: use 0 (every token) or a ratio "
                            f"such as 3.0")
        if float(self.awq_drop_massive) > 0 and not self.awq_scales:
            raise UserError("--awq-drop-massive narrows --awq-scales's search, which is off: add --awq-scales or drop "
                            "--awq-drop-massive")
        if not (0 <= float(self.gptaq_alpha) <= 1):
            raise UserError(f"--gptaq {self.gptaq_alpha} is outside [0, 1]: 0 is plain GPTQ, 1 the full asymmetric "
                            f"correction, e.g. 0.25")
        if self.method == "rtn" and float(self.gptaq_alpha) > 0:
            raise UserError("--gptaq changes how GPTQ calibrates; round-to-nearest has no calibration: drop --gptaq "
                            "or use --method gptq")
        if self.method == "rtn" and self.shrink != 0:
            raise UserError("--shrink regularizes GPTQ's Hessian; round-to-nearest uses none: drop --shrink or use "
                            "--method gptq")
        if self.method == "rtn" and self.refit_scales:
            raise UserError("--refit-scales refits the scales to GPTQ's calibration objective; round-to-nearest has "
                            "none: drop it or use --method gptq")
        if self.act_group_aware and not self.desc_act and self.method == "gptq":
            raise UserError("--act-group-aware is an act-order (whole groups by decreasing Hessian diagonal): drop "
                            "--no-desc-act or --act-group-aware")
        if self.act_group_aware:  # its groups' scales are set as GPTQ reaches them: the config must not say up front
            object.__setattr__(self, "static_groups", False)
        if self.method == "rtn":  # act-order and static groups are GPTQ's: an RTN checkpoint must not claim them
            object.__setattr__(self, "desc_act", False)
            object.__setattr__(self, "static_groups", False)
            object.__setattr__(self, "act_group_aware", False)
            object.__setattr__(self, "rtn_massive", 0.0)  # every layer is round-to-nearest already
        for name, kind in (("damp", float), ("damp_auto", float), ("gptaq_alpha", float), ("rtn_massive", float),
                           ("awq_drop_massive", float),
                           ("desc_act", bool), ("static_groups", bool), ("act_group_aware", bool), ("sym", bool),
                           ("mse", bool),
                           ("refit_scales", bool), ("rtn_massive_thin", bool), ("lm_head", bool), ("awq_scales", bool)):
            object.__setattr__(self, name, kind(getattr(self, name)))

    def damp_for(self, in_features: int, tokens: int) -> float:
        """The damping of one layer: --damp, raised to ALPHA x inputs / tokens where calibration is thin."""
        if self.damp_auto <= 0 or tokens <= 0:
            return self.damp
        return min(max(self.damp, self.damp_auto * in_features / tokens), MAX_DAMP)

    def layer_method(self, input_peak: float, in_features: int, tokens: int) -> str:
        """How a layer is quantized, given its inputs' `HessianAccumulator.input_peak`, its input features and its
        calibration tokens: the run's method, or "rtn-massive" where --rtn-massive rounds a GPTQ run's layer to
        nearest."""
        massive = self.rtn_massive > 0 and input_peak > self.rtn_massive
        thin = tokens < in_features or not self.rtn_massive_thin
        return "rtn-massive" if self.method == "gptq" and massive and thin else self.method

    def quantization_config(self) -> dict:
        """The `quantization_config` keys of FORMAT.md (meta is added by the writer)."""
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
                "desc_act": self.desc_act, "sym": self.sym, "damp_percent": self.damp,
                "static_groups": self.static_groups, "true_sequential": True,
                "checkpoint_format": "gptq", "lm_head": self.lm_head}

    def run_settings(self) -> dict:
        """How the run calibrated, beyond the format's keys (quant_report.json, meta, resume identity).
        gptaq_alpha and refit_scales only appear when on: loaders need nothing new, the checkpoint format is
        unchanged, and a classic run's records stay as they were."""
        out = {"method": self.method, "mse": self.mse, "forward_dtype": self.forward_dtype}
        if self.method == "gptq":
            out["damp_auto"] = self.damp_auto
        out |= {k: getattr(self, k) for k, off in OPT_IN_RUN_SETTINGS.items() if getattr(self, k) != off}
        if self.rtn_massive:
            out["rtn_massive_thin"] = self.rtn_massive_thin
        return out

    # ---------------------------------------------------------------- the command line

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One option per field, in argument groups named by the fields' `group`."""
        groups: dict[str, argparse._ArgumentGroup] = {}
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata)
            group = groups.setdefault(meta.pop("group"), parser.add_argument_group(f.metadata["group"]))
            flag = meta.pop("flag") or "--" + f.name.replace("_", "-")
            inverse, negatable = meta.pop("inverse", False), meta.pop("negatable", False)
            if f.type in ("bool", bool):
                if inverse:
                    group.add_argument(flag, dest=f.name, action="store_false", **meta)
                elif f.default or negatable:
                    group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                       **meta)
                else:
                    group.add_argument(flag, dest=f.name, action="store_true", **meta)
                continue
            kind = meta.pop("type", None) or {"int": int, "float": float, "str": str, "int | None": int}[str(f.type)]
            group.add_argument(flag, dest=f.name, type=kind, default=f.default, **meta)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "QuantSettings":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


SHRINK_AUTO = "auto"


def _shrink_value(value) -> float | str:
    """--shrink as given (a number, a numeric string or "auto"): a float in [0, 1] or SHRINK_AUTO."""
    if isinstance(value, str) and value.strip().lower() == SHRINK_AUTO:
        return SHRINK_AUTO
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if isinstance(value, bool) or number is None or not 0 <= number <= 1:
        raise UserError(f"--shrink {value} is invalid: use a number in [0, 1] (0 is classic GPTQ; 0.5 halves every "
                        f"correlation in the Hessian) or auto")
    return number


# The run settings a record names only when on (QuantSettings.run_settings), with the value that means off:
# what a reader of older records fills in (they predate the setting, which was off then).
OPT_IN_RUN_SETTINGS = {"shrink": 0.0, "gptaq_alpha": 0.0, "refit_scales": False, "rtn_massive": 0.0,
                       "awq_scales": False, "awq_drop_massive": 0.0, "act_group_aware": False}
