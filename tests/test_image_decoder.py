"""One image decoder for the CLI, the client and the server (issue 18 §1.8).

``kandinsky-trt client`` reads files with ``client.read_image`` and sends uint8 arrays; the server
turns them back into PIL images (``serve/calls.py``); ``generate`` opens the same files with
``load_image_file``. An img2img and an inpaint request with an image and a mask of another size
give, bit for bit, the CLI's image (in-process, on CPU, through ``calls.run_item``).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kandinsky_trt.runtime.processing.images import (
    ImageInputError, image_from_array, load_image_file, mask_from_array, prepare_img2img_image,
    prepare_inpaint_inputs)
from kandinsky_trt.runtime.serve import calls
from kandinsky_trt.runtime.serve.client import ClientError, read_image

SIZES = [(37, 53), (100, 80), (64, 64), (200, 120), (17, 301)]  # (height, width): smaller, larger, odd


def _files(tmp_path, height: int, width: int, mode: str = "RGB") -> tuple:
    """A noisy RGB(A) image and a colour-free mask of ``height x width``, saved as PNG."""
    rng = np.random.default_rng(height * 1000 + width)
    pixels = rng.integers(0, 256, (height, width, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    image, mask = tmp_path / f"image_{height}x{width}.png", tmp_path / f"mask_{height}x{width}.png"
    Image.fromarray(pixels, mode).save(image)
    square = np.zeros((height, width), np.uint8)
    square[height // 4: 3 * height // 4, width // 3: 2 * width // 3] = 255
    Image.fromarray(np.stack([square] * 3, -1), "RGB").save(mask)  # an RGB file, as drawn in an editor
    return image, mask


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize("height,width", SIZES)
def test_served_arrays_preprocess_as_the_cli_files(height, width, mode, tmp_path):
    image_path, mask_path = _files(tmp_path, height, width, mode)
    cli_image, cli_mask = load_image_file(image_path, "RGB", "--image"), load_image_file(mask_path, "L", "--mask")
    sent_image, sent_mask = read_image(image_path, "RGB"), read_image(mask_path, "L")
    served_image, served_mask = calls.served_image(sent_image), calls.mask_array(sent_mask)
    for out_h, out_w in ((64, 64), (64, 128), (128, 64)):
        cli = prepare_img2img_image(cli_image, out_h, out_w)
        np.testing.assert_array_equal(prepare_img2img_image(served_image, out_h, out_w), cli)
        np.testing.assert_array_equal(prepare_img2img_image(sent_image, out_h, out_w), cli)  # the raw array too
        cli_pair = prepare_inpaint_inputs(cli_image, cli_mask, out_h, out_w)
        for image, mask in ((served_image, served_mask), (sent_image, served_mask)):
            served_pair = prepare_inpaint_inputs(image, mask, out_h, out_w)
            np.testing.assert_array_equal(served_pair[0], cli_pair[0])
            np.testing.assert_array_equal(served_pair[1], cli_pair[1])


def test_uint8_arrays_resize_as_pil_images_do():
    """The Python API's uint8 arrays follow the PIL path: bicubic, not nearest (img2img) nor refused (inpaint)."""
    array = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    pil = Image.fromarray(array)
    np.testing.assert_array_equal(prepare_img2img_image(array, 64, 64), prepare_img2img_image(pil, 64, 64))
    resized = np.asarray(pil.resize((64, 64), resample=Image.BICUBIC, reducing_gap=1)).astype(np.float32)
    np.testing.assert_array_equal(prepare_img2img_image(array, 64, 64)[0], (2 * resized / 255 - 1).transpose(2, 0, 1))
    mask = np.zeros((64, 64), np.float32)
    np.testing.assert_array_equal(prepare_inpaint_inputs(array, mask, 64, 64)[0],
                                  prepare_inpaint_inputs(pil, mask, 64, 64)[0])


def test_arrays_of_the_output_size_are_unchanged():
    """Same-size uint8 arrays give what they gave before (no resampling at all)."""
    array = np.random.default_rng(1).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    chw = array.transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(prepare_img2img_image(array, 64, 128)[0], 2.0 * (chw / np.float32(255)) - 1.0)
    pixels, _ = prepare_inpaint_inputs(array, np.zeros((64, 128), np.float32), 64, 128)
    np.testing.assert_array_equal(pixels[0], chw / np.float32(127.5) - 1)
    sent = (np.arange(64 * 128).reshape(64, 128) % 256).astype(np.uint8)
    _, keep = prepare_inpaint_inputs(array, calls.mask_array(sent), 64, 128)
    np.testing.assert_array_equal(keep[0, 0], (sent < 128).astype(np.float32))  # 255 = repaint, cut at 0.5


def test_decoder_errors(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageInputError, match=r"^--image: expected a readable image file, found '.*broken.png'"):
        load_image_file(broken, "RGB", "--image")
    with pytest.raises(ClientError, match=r"broken.png: expected a readable image file"):
        read_image(broken, "RGB")
    with pytest.raises(ImageInputError, match=r"^image: expected a uint8 HxWx3 array, found float32 \(4, 4, 3\)"):
        image_from_array(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageInputError, match=r"^mask: expected a uint8 HxW array, found uint8 \(4, 4, 3\)"):
        mask_from_array(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ImageInputError, match=r"^image: expected an image of at least 1x1 pixels"):
        image_from_array(np.zeros((0, 4, 3), np.uint8))


@pytest.fixture(scope="module")
def served_pipelines(artifacts_fp32):
    from kandinsky_trt.runtime import Components

    return calls.Pipelines(Components(artifacts_fp32[0]))


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_served_request_of_another_size_gives_the_cli_image(task, served_pipelines, artifacts_fp32, tmp_path):
    """calls.run_item (what the server runs for one item, from the arrays the client sends) ==
    ``kandinsky-trt generate`` on the files (run in-process), for a 100x80 image and mask."""
    from kandinsky_trt.runtime.cli.main import main
    from kandinsky_trt.runtime.serve.requests import Item

    image_path, mask_path = _files(tmp_path, 100, 80)
    item = Item(task=task, prompt="a red fox", seed=3, num_inference_steps=2, prior_steps=2,
                strength=0.6 if task == "img2img" else None, image=read_image(image_path, "RGB"),
                mask=read_image(mask_path, "L") if task == "inpaint" else None)
    served = calls.run_item(served_pipelines, item)["images"]
    out = tmp_path / "cli.png"
    argv = ["generate", "a red fox", "--artifacts", str(artifacts_fp32[0]), "--image", str(image_path),
            "--steps", "2", "--prior-steps", "2", "--seed", "3", "--out", str(out)]
    argv += ["--strength", "0.6"] if task == "img2img" else ["--mask", str(mask_path)]
    assert main(argv) == 0
    assert served.shape[0] == 1
    np.testing.assert_array_equal(served[0], np.asarray(Image.open(out).convert("RGB")))
