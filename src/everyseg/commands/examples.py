"""The examples each `everyseg` verb shows under its --help, and the top-level ones under
`everyseg --help` (tests/test_cli_habits.py checks every verb has them)."""

EXAMPLES = {
    "everyseg": """examples:
  everyseg demo                                    # the whole job on synthetic shapes, CPU
  everyseg synth everyseg-synth                    # data for the -tiny presets
  everyseg train baseline-tiny --out runs/a        # train, evaluate, draw overlays
  everyseg evaluate runs/a                         # COCO AP: all / seen / unseen classes
  everyseg predict runs/a img1.png img2.png --out pred
  everyseg VERB --help                             # each verb's options and examples""",
    "synth": """examples:
  everyseg synth everyseg-synth                    # what the -tiny presets read
  everyseg synth data --train 200 --val 50 --size 96 --seed 1
  everyseg synth everyseg-vocab --vocab 1000       # maskx-vg-tiny's 1,000-class stand-in
  everyseg synth everyseg-hard --preset hard       # masks that depend on the class (seen split:
                                                   #   everyseg-hard/seen_classes.txt)""",
    "train": """examples:
  everyseg train baseline-tiny --out runs/a
  everyseg train maskx --out runs/b --set data.train_json=coco/train.json \\
      --set data.train_images=coco/train2017 --set train.lr=1e-3
  everyseg train my.yaml --out runs/a --resume      # continue a stopped run
  torchrun --nproc_per_node=8 -m everyseg train maskrcnn --out runs/c""",
    "evaluate": """examples:
  everyseg evaluate runs/a                         # data.val_json -> runs/a/metrics.json
  everyseg evaluate runs/a --checkpoint best --precision fp32
  everyseg evaluate runs/a --data other.json --images other/  # -> metrics-other.json""",
    "predict": """examples:
  everyseg predict runs/a photo.jpg --out pred
  everyseg predict runs/a imgs/*.png --out pred --score-thresh 0.3 --checkpoint best
  everyseg predict runs/a photos/ 'more/**/*.jpg' --out pred --batch-size 8
  everyseg predict runs/a coco/val2017 --data coco/val.json --out pred  # COCO image ids
  everyseg predict runs/fcn photo.jpg --out pred  # an FCN run: labels/ (class ids), overlays/""",
    "segment": """examples:
  everyseg segment runs/a photo.jpg --box 10 20 60 90 --out seg
  everyseg segment runs/a photo.jpg --box 10 20 60 90 --box 0 0 32 32 --out seg""",
    "check-data": """examples:
  everyseg check-data baseline-tiny                # a config's train and val sets
  everyseg check-data coco/train.json --images coco/train2017 --decode
  everyseg check-data maskx --set data.train_json=t.json --set data.train_images=t/ --json""",
    "convert": """examples:
  everyseg convert vg --objects objects.json --image-data image_data.json \\
      --classes 3000 --out vg3000.json""",
    "vg": """examples:
  everyseg convert vg --objects objects.json --image-data image_data.json \\
      --classes 3000 --out vg3000.json --aliases aliases.yaml""",
    "export": """examples:
  everyseg export runs/a --format onnx --out a.onnx        # NMS and mask paste inside
  everyseg export runs/a --format torchscript --out a.pt --checkpoint best""",
    "report": """examples:
  everyseg report runs/a --out a.html              # curves, per-class AP, PR, gallery
  everyseg report runs/a runs/b runs/c --out compare.html --gallery 2""",
    "study": """examples:
  everyseg study maskx --out studies/maskx          # 3 seeds, each preset's schedule
  everyseg study deepmac --out studies/deepmac --seeds 2 --steps 500 --jobs 2
  everyseg study maskrcnn --out studies/mrcnn --data everyseg-synth --set train.device=cuda
  everyseg study maskx --out studies/maskx          # again: keeps finished runs, resumes""",
    "demo": """examples:
  everyseg demo                                    # everyseg-demo/: data and run
  everyseg demo --out /tmp/demo --steps 200 --train 100 --val 20""",
}
