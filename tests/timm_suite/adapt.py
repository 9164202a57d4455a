"""Copy timm's tests/test_models.py, adding the T2T-ViT models to the lists timm keeps for its ViTs.

    python tests/timm_suite/adapt.py SOURCE DEST

``NON_STD_FILTERS`` gets ``t2t_vit*`` (token models without conv-style spatial features) and
``FEAT_INTER_FILTERS`` gets ``timm_models`` (the module that registers them, as timm names modules), so the
forward_intermediates / features_only tests run on them too. Nothing else is changed."""
import re
import sys

ADDITIONS = {"NON_STD_FILTERS": "'t2t_vit*'", "FEAT_INTER_FILTERS": "'timm_models'"}


def adapt(text):
    for name, entry in ADDITIONS.items():
        pattern = re.compile(rf"^{name} = \[\n", re.MULTILINE)
        if not pattern.search(text):
            raise SystemExit(f"adapt.py: {name} not found in timm's test_models.py; the suite changed shape")
        text = pattern.sub(lambda m: m.group(0) + f"    {entry},\n", text, count=1)
    return text


if __name__ == "__main__":
    source, dest = sys.argv[1:]
    with open(source) as f:
        text = f.read()
    with open(dest, "w") as f:
        f.write(adapt(text))
