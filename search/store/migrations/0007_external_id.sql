-- 7: a caller's own id for an image (`POST /v1/images` form field `external_id`): kept, searchable
-- (`GET /v1/images?external_id=X`), returned in image answers. At most one image per external id and one external
-- id per image (NULL for most images: a partial unique index, so NULLs never collide). Forgetting an image
-- (`DELETE /v1/images/{id}`, `nsfw-index forget`) drops it with the row; the forget run's args keep it for the audit.
ALTER TABLE images ADD COLUMN external_id TEXT;
CREATE UNIQUE INDEX images_external_id ON images(external_id) WHERE external_id IS NOT NULL;
CREATE INDEX runs_kind ON runs(kind);
