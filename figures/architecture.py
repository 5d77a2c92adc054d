"""Draw figures/architecture.png: Chroma's components, the backbone's prompt layout and the 1:2 text/audio schedule.

    python figures/architecture.py [--output figures/architecture.png]

Sizes are those of the published checkpoint (FlashLabs/Chroma-4B); nothing is loaded: the figure is drawn from the
facts in docs/architecture.md. Needs matplotlib.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402


COLORS = {"thinker": "#8ecae6", "backbone": "#ffb703", "decoder": "#fb8500", "codec": "#90be6d", "input": "#e9ecef",
          "text": "#cdb4db", "zero": "#ffffff"}


def box(ax, x, y, w, h, label, color, fontsize=9):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=color,
                                edgecolor="#333333", linewidth=1))
    ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=fontsize)


def arrow(ax, start, end, label=None):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#333333", linewidth=1.2))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, label, ha="center", fontsize=8,
                color="#333333")


def draw_components(ax):
    """Top panel: user audio -> thinker -> backbone -> depth decoder -> Mimi -> speech."""
    ax.set_xlim(0, 15)
    ax.set_ylim(0, 3.4)
    ax.axis("off")
    ax.set_title("Components (published sizes)", loc="left", fontsize=11)
    box(ax, 0.1, 2.1, 2.2, 0.8, "user audio / text", COLORS["input"])
    box(ax, 0.1, 0.4, 2.2, 0.8, "reference voice\n+ transcript", COLORS["input"])
    box(ax, 3.0, 2.0, 2.8, 1.0, "thinker\nQwen2.5-Omni-3B\n(audio encoder + LM)", COLORS["thinker"])
    box(ax, 3.0, 0.3, 2.8, 1.0, "Mimi encoder\n8 codes / 80 ms frame", COLORS["codec"])
    box(ax, 6.6, 1.1, 2.6, 1.2, "backbone\nLlama 16 × 2048\n→ codebook 0", COLORS["backbone"])
    box(ax, 9.9, 1.1, 2.5, 1.2, "depth decoder\nLlama 4 × 1024\n→ codebooks 1..7", COLORS["decoder"])
    box(ax, 12.9, 1.1, 2.0, 1.2, "Mimi decoder\n→ 24 kHz\nspeech", COLORS["codec"])
    arrow(ax, (2.3, 2.5), (3.0, 2.5))
    arrow(ax, (2.3, 0.8), (3.0, 0.8))
    arrow(ax, (5.8, 2.5), (6.6, 1.95), "hidden + text")
    arrow(ax, (5.8, 0.8), (6.6, 1.45), "frames")
    arrow(ax, (9.2, 1.7), (9.9, 1.7), "h, c0")
    arrow(ax, (12.4, 1.7), (12.9, 1.7))
    ax.text(7.9, 0.55, "one frame = sum of its 8 code embeddings (shared audio table)", ha="center", fontsize=8)


def draw_prompt(ax):
    """Middle panel: the backbone's prompt, slot by slot."""
    ax.set_xlim(0, 15)
    ax.set_ylim(0, 1.6)
    ax.axis("off")
    ax.set_title("Backbone prompt (one row; every slot is a 2048-d vector)", loc="left", fontsize=11)
    slots = [("text_start", COLORS["text"], 1.0), ("transcript ids …", COLORS["text"], 1.9),
             ("text_end", COLORS["text"], 1.0), ("reference frames 1..F …", COLORS["codec"], 2.6),
             ("0", COLORS["zero"], 0.5), ("h₀", COLORS["thinker"], 0.6), ("E(t₁)", COLORS["text"], 0.8)]
    x = 0.1
    for label, color, width in slots:
        box(ax, x, 0.5, width, 0.6, label, color, fontsize=8)
        x += width + 0.1
    ax.text(x + 0.1, 0.8, "→ codebook 0 of frame 1", va="center", fontsize=9)
    ax.text(0.1, 0.15, "E = thinker token embedding, h = thinker's last hidden state (post-norm), 0 = all-zero vector "
                       "closing the reference audio", fontsize=8)


def draw_schedule(ax, steps: int = 9):
    """Bottom panel: what the backbone reads at each step: a frame every step, a (h, text) pair every other."""
    ax.set_xlim(0, 15)
    ax.set_ylim(0, 2.2)
    ax.axis("off")
    ax.set_title("1 : 2 schedule — one text token per two audio frames (160 ms)", loc="left", fontsize=11)
    width = 14.6 / steps
    for step in range(1, steps + 1):
        x = 0.1 + (step - 1) * width
        ax.text(x + width / 2, 1.95, f"step {step}", ha="center", fontsize=8)
        if step == 1:
            box(ax, x + 0.05, 1.1, width - 0.1, 0.6, "prompt", COLORS["input"], fontsize=8)
            continue
        box(ax, x + 0.05, 1.1, width - 0.1, 0.6, f"frame {step - 1}", COLORS["codec"], fontsize=8)
        if step % 2 == 1:
            j = (step - 1) // 2
            box(ax, x + 0.05, 0.35, width - 0.1, 0.6, f"h{j}, E(t{j + 1})", COLORS["thinker"], fontsize=8)
    ax.text(0.1, 0.05, "each step's last slot predicts the next frame's codebook 0; the thinker runs one token on "
                       "every other step and stops after <|im_end|>", fontsize=8)


def draw(output: Path) -> Path:
    fig, axes = plt.subplots(3, 1, figsize=(12, 8), gridspec_kw={"height_ratios": [3.4, 1.6, 2.2]})
    draw_components(axes[0])
    draw_prompt(axes[1])
    draw_schedule(axes[2])
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "architecture.png")
    args = parser.parse_args(argv)
    draw(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
