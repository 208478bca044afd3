-- 5: thumbnails (indexer/thumbnails.py), made at index time only in a store created with `index --thumbnails`
-- (store_info key `thumbnails`). One row per image: a small JPEG (`original`, at most 256 px a side) and a
-- server-side blurred JPEG of the same size that shows nothing recognisable (`blurred`). Served by
-- `GET /v1/images/{id}/thumbnail`, never read from stored paths. Dropped with their image (the trigger), so an
-- image the store forgets leaves no pixels behind.
CREATE TABLE thumbnails (
    image_id INTEGER PRIMARY KEY,
    width INTEGER NOT NULL, height INTEGER NOT NULL,
    original BLOB NOT NULL, blurred BLOB NOT NULL
);
CREATE TRIGGER thumbnails_drop_with_image AFTER DELETE ON images
    BEGIN DELETE FROM thumbnails WHERE image_id = OLD.id; END;
