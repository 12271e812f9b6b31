ALTER TABLE local_user
    ADD COLUMN enable_animated_images boolean DEFAULT TRUE NOT NULL;

