"""Small helpers every part of chatlm uses: atomic files, one-line text, process facts."""
