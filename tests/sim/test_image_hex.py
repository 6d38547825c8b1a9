"""The Verilog memory model's image files, made and read in numpy (sim.accel_sim.image_hex / hex_image):
byte for byte the per-word Python formatting they replace, at every memory word width, on random bytes
and on the rails (all-zero and all-ones words, a single set top or bottom bit)."""

import numpy as np
import pytest

from sim.accel_sim import hex_image, image_hex, image_words, words_image


def _old_hex(image, W):
    return "".join(f"{w:0{(W + 3) // 4}x}\n" for w in image_words(image, W)).encode()


def _edge_image(W, rng, n_random=200):
    nb = W // 8
    words = [np.zeros(nb, np.uint8), np.full(nb, 255, np.uint8)]
    for b in (0, nb - 1):  # lowest and highest byte: catches a byte order swapped within the word
        for v in (1, 0x80, 0x0F, 0xF0):
            w = np.zeros(nb, np.uint8)
            w[b] = v
            words.append(w)
    words.append(rng.integers(0, 256, n_random * nb, dtype=np.uint8))
    return np.concatenate(words)


@pytest.mark.parametrize("W", [64, 128, 256, 512])
def test_image_hex_equals_per_word_formatting(W):
    img = _edge_image(W, np.random.default_rng(W))
    assert image_hex(img, W) == _old_hex(img, W)


@pytest.mark.parametrize("W", [64, 128, 256, 512])
def test_hex_image_reads_back(W):
    img = _edge_image(W, np.random.default_rng(W + 1))
    text = image_hex(img, W)
    n = img.size // (W // 8)
    assert np.array_equal(hex_image(text, W, n), img)
    # upper-case digits, as another simulator may write them
    assert np.array_equal(hex_image(text.upper(), W, n), img)
    # only the first n words are taken (the model's memory is deeper than the image)
    assert np.array_equal(hex_image(text, W, n - 3), img[: (n - 3) * (W // 8)])
    assert np.array_equal(words_image([int(ln, 16) for ln in text.decode().split()], W), img)


def test_hex_image_refuses_what_it_cannot_read():
    W = 64
    img = _edge_image(W, np.random.default_rng(5), 10)
    text = image_hex(img, W)
    n = img.size // 8
    assert hex_image(text[:-1], W, n) is None                          # short file
    assert hex_image(b"// comment\n" + text, W, n) is None             # a comment line
    assert hex_image(text.replace(b"f", b"x", 1), W, n) is None        # an x digit
    assert hex_image(text.replace(b"\n", b" ", 1), W, n) is None       # lines not one word each


def test_image_checks_still_named():
    with pytest.raises(ValueError, match="whole number of 512-bit"):
        image_hex(np.zeros(65, np.uint8), 512)
    with pytest.raises(ValueError, match="empty"):
        image_hex(np.zeros(0, np.uint8), 512)
