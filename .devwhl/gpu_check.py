import sys, time, warnings, torch
from pathlib import Path
warnings.simplefilter("ignore")
from coatflux.flux.tiny import make_tiny_flux
from coatflux.trainer.config import load_config
from coatflux.trainer.loop import train
from coatflux.flux.lora import read_lora
repo = Path(sys.argv[1]); work = Path("/tmp/w"); work.mkdir(exist_ok=True)
make_tiny_flux(work / "tiny-flux")
def cfg(name, steps, **extra):
    o = {"train.steps": steps, "config.name": name, "model.name_or_path": str(work / "tiny-flux"),
         "training_folder": str(work / "output"), "datasets[0].folder_path": str(repo / "examples/clothing"),
         "performance_log_every": 10, "sample.sample_every": 15, **extra}
    return load_config(repo / "examples/tiny_flux_lora.yaml", o)
t = time.time(); r = train(cfg("coat", 30), device="cuda"); print("COAT cuda 30 steps", time.time() - t, "s, last losses", r.losses[-5:], r.samples)
t = time.time(); r2 = train(cfg("bf16", 30, **{"coat.enabled": False, "train.optimizer": "adamw"}), device="cuda"); print("bf16 cuda", time.time() - t, r2.losses[-5:])
a = train(cfg("res", 3), device="cuda"); a = train(cfg("res", 6), device="cuda"); b = train(cfg("straight", 6), device="cuda")
ta, tb = read_lora(a.lora_path)[0], read_lora(b.lora_path)[0]
print("resume equal on cuda:", all(torch.equal(ta[k], tb[k]) for k in ta), "max diff", max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta))
print("losses", a.losses, b.losses[3:])
