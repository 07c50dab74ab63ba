"""The benchmark's reference: a plain fine-tune, used only by ``make bench-train``.

    python -m fieldid.training.bench_reference SPLIT.json   # {"labels", "seed", "train": [[path, y]], "test"}

3 epochs of full fine-tuning of ImageNet MobileNetV2, AdamW 3e-4, 160-px squashed photos,
no augmentation, no head phase, no early stopping: what a user writes in 30 lines.
Prints one JSON line ``{"test_accuracy", "seconds", "test_predictions"}``.
"""
import json
import sys
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from .models import create_model


def main(split_json: str) -> None:
    t0 = time.time()
    d = json.loads(open(split_json).read())
    torch.manual_seed(d.get("seed", 0))
    tf = T.Compose([T.Resize((160, 160)), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    train = [(tf(Image.open(p).convert("RGB")), y) for p, y in d["train"]]
    test = [(tf(Image.open(p).convert("RGB")), y) for p, y in d["test"]]
    model = create_model("mobilenet_v2", len(d["labels"]))  # ImageNet weights, new head
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for epoch in range(3):
        model.train()
        for x, y in DataLoader(train, batch_size=32, shuffle=True):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"reference: epoch {epoch + 1}/3 done, last loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.eval()
    with torch.no_grad():
        pred = [int(p) for x, _ in DataLoader(test, batch_size=64) for p in model(x).argmax(1)]
    correct = sum(p == y for p, (_, y) in zip(pred, test))
    print(json.dumps({"test_accuracy": correct / len(test), "seconds": round(time.time() - t0, 1),
                      "test_predictions": pred}))


if __name__ == "__main__":
    main(sys.argv[1])
